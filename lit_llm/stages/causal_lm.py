"""Pretraining: next-token prediction."""

from __future__ import annotations

import torch
from torchmetrics.text import Perplexity

from lit_llm.backbone.moe import expert_load, moe_aux_losses, moe_layers, update_moe_biases
from lit_llm.losses import next_token_loss
from lit_llm.stages.base import Stage


class CausalLM(Stage):
    """Next-token cross-entropy on packed text; logs loss, perplexity and learning rate.

    Args:
        sample_prompts: Texts the sample callback continues; by default the DataModule's ``sample_prompts()``.
        moe_bias_rate: Step size of the auxiliary-loss-free router bias update (MoE models built with
            ``moe_bias_update``). MoE models also add the load-balancing and router z-losses to the training
            objective, weighted by ``moe_aux_loss_coef`` / ``moe_z_loss_coef`` (logged under ``moe/``).
        (all other arguments: see ``Stage``)
    """

    stage_name = "pretrain"

    def __init__(
        self, *args, sample_prompts: list[str] | None = None, moe_bias_rate: float = 1e-3, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.moe_bias_rate = moe_bias_rate
        self.sample_prompts = sample_prompts
        self.val_ppl = Perplexity()

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch  # (B, T) inputs and next-token targets
        logits = self.model(x)  # (B, T, V)
        loss = next_token_loss(logits, y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step
        )
        if stage != "train":
            self.val_ppl(logits.float(), y)
            self.log(f"{stage}/ppl", self.val_ppl, on_epoch=True)
            return loss
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)
        aux = moe_aux_losses(self.model)  # {} without MoE layers
        if aux:  # load balancing and router z-loss join the objective; train/loss stays the pure LM loss
            for name in ("load_balancing", "router_z", "max_load"):
                self.log(f"moe/{name}", aux[name], on_step=True)
            return loss + aux["loss"]
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if not moe_layers(self.model):
            return
        if self.config.moe_bias_update:
            update_moe_biases(self.model, self.moe_bias_rate)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            load = expert_load(self.model)  # (n_moe_layers, E), rows sum to 1
            E = load.shape[1]
            for i, row in enumerate(load):
                self.log(f"moe_load/layer{i}_min", row.min() * E, on_step=True)  # 1.0 = perfectly balanced
                self.log(f"moe_load/layer{i}_max", row.max() * E, on_step=True)
            exp = getattr(self.logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_histogram"):
                for i, row in enumerate(load):
                    # one sample per expert, weighted by its share: a histogram over expert ids
                    exp.add_histogram(
                        f"moe_load/layer{i}",
                        torch.repeat_interleave(torch.arange(E), (row * 1000).round().long().cpu()),
                        self.global_step,
                    )

    def sample_texts(self, max_new_tokens: int = 48) -> list[tuple[str, str]]:
        """(prompt, greedy continuation) for each sample prompt."""
        from lit_llm.backbone.generate import generate

        if self.sample_prompts is None:
            provider = self.data_hook("sample_prompts")
            self.sample_prompts = list(provider()) if provider is not None else []
        texts = [p for p in self.sample_prompts if p]
        if not texts:
            return []
        tok = self.tokenizer
        out = generate(
            self.model,
            [tok.encode(p) for p in texts],
            max_new_tokens,
            stop_tokens=[tok.eos_id] if tok.eos_id is not None else [],
            pad_id=tok.pad_id,
        )
        return [(p, tok.decode(r)) for p, r in zip(texts, out.response_lists())]
