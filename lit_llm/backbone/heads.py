"""A transformer with a scalar head: the reward model and the PPO critic.

The head reads the final hidden state (not the logits). A reward model scores a whole sequence at its last
real token; a critic predicts a value at every token.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_llm.backbone.model import Transformer
from lit_llm.rl.ppo_math import last_token_index  # a leaf module of pure functions


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (left padding does not shift them): ``(B, T)``."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal ``(B, 1, T, T)`` mask hiding padded keys (each position always sees itself)."""
    T = valid.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return ((causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device))[:, None]


class ScalarHeadModel(nn.Module):
    """``Transformer`` + ``Linear(n_embd, 1)`` on its final hidden states.

    Args:
        backbone: The transformer (its ``lm_head`` is kept but unused here).
    """

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.model = backbone
        self.value_head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.normal_(self.value_head.weight, std=1 / (backbone.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    def hidden(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``(B, T, C)``; ``valid`` ``(B, T)`` marks real tokens (any padding side)."""
        if valid is None:
            return self.model.hidden(idx)
        return self.model.hidden(idx, positions_from_valid(valid), padding_mask(valid))

    def values(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """A scalar per token ``(B, T)``; ``valid`` ``(B, T)`` marks real tokens (any padding side)."""
        return self.value_head(self.hidden(idx, valid)).squeeze(-1).float()  # (B, T)

    def pool(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sequence scores ``(B,)`` from hidden states ``(B, T, C)``, read at each row's last real token."""
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(valid)]  # (B, C)
        return self.value_head(last).squeeze(-1).float()

    def forward(self, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sequence scores ``(B,)`` read at each row's last real token."""
        return self.pool(self.hidden(idx, valid), valid)
