"""Scalar heads on the transformer: the reward model and the PPO critic.

The head reads the final hidden state (not the logits). A reward model scores a whole sequence at its last
real token; a critic predicts a value at every token. Batches may be padded on either side: positions and
masks come from the padding mask (``lit_llm.backbone.masks``).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_llm.backbone.masks import last_token_index, padding_mask, positions_from_padding
from lit_llm.backbone.model import Transformer


def new_value_head(n_embd: int) -> nn.Linear:
    """``Linear(n_embd, 1)`` with a small normal init and zero bias (initial scores near 0)."""
    head = nn.Linear(n_embd, 1)
    nn.init.normal_(head.weight, std=1 / (n_embd + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


def sequence_hidden(
    backbone: Transformer, idx: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states ``(B, T, C)``; ``valid`` ``(B, T)`` marks real tokens (any padding side)."""
    if valid is None:
        return backbone.hidden(idx)
    return backbone.hidden(idx, positions_from_padding(valid), padding_mask(valid))


def pool_last(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The hidden state ``(B, C)`` of each row's last real token."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(valid)]


class ScalarHeadModel(nn.Module):
    """``Transformer`` + ``Linear(n_embd, 1)`` on its final hidden states.

    Args:
        backbone: The transformer (its ``lm_head`` is kept but unused here).
    """

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.model = backbone
        self.value_head = new_value_head(backbone.config.n_embd)

    def values(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """A scalar per token ``(B, T)``; ``valid`` ``(B, T)`` marks real tokens (any padding side)."""
        return self.value_head(sequence_hidden(self.model, idx, valid)).squeeze(-1).float()  # (B, T)

    def forward(self, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sequence scores ``(B,)`` read at each row's last real token."""
        return self.value_head(pool_last(sequence_hidden(self.model, idx, valid), valid)).squeeze(-1).float()
