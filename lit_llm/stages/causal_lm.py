"""Pretraining: next-token prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from lit_llm.stages.base import Stage


class CausalLM(Stage):
    """Next-token cross-entropy on packed text; logs loss, perplexity and learning rate.

    Args:
        sample_prompts: Texts the sample callback continues (defaults fit tinyworld).
        (all other arguments: see ``Stage``)
    """

    stage_name = "pretrain"

    def __init__(self, *args, sample_prompts: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sample_prompts = sample_prompts or ["Alice is in the", "Bob has 3"]
        self.val_ppl = Perplexity()

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch  # (B, T) inputs and next-token targets
        logits = self.model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step
        )
        if stage != "train":
            self.val_ppl(logits.float(), y)
            self.log(f"{stage}/ppl", self.val_ppl, on_epoch=True)
        else:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)
        return loss

    def sample_texts(self, max_new_tokens: int = 48) -> list[tuple[str, str]]:
        """(prompt, greedy continuation) for each sample prompt."""
        from lit_llm.backbone.generate import generate

        tok = self.tokenizer
        prompts = [tok.encode(p) for p in self.sample_prompts]
        out = generate(self.model, prompts, max_new_tokens, stop_tokens=[tok.eos_id], pad_id=tok.pad_id)
        return [(p, tok.decode(r)) for p, r in zip(self.sample_prompts, out.response_lists())]
