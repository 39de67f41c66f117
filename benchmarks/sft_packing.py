"""SFT with and without packing, from a pretraining checkpoint: real tokens/s and validation loss.

Packing puts several conversations into one row (block-diagonal attention, positions restarting per
conversation) instead of padding each to the longest in its batch. Both runs take the same number of
optimizer steps, but a packed batch holds more conversations, so the table reports the real (non-pad)
tokens trained on as well; validation is unpacked in both cases so the losses compare directly.

    python benchmarks/sft_packing.py --ckpt checkpoints/pretrain/last.ckpt --steps 150
"""

from __future__ import annotations

import argparse
import time

import torch
from lightning import Callback, Trainer

from lit_llm.data.sft import SFTDataModule
from lit_llm.stages.sft import SFTModule


class RealTokens(Callback):
    """Counts non-padding input tokens seen in training."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int((batch["input_ids"] != pl_module.tokenizer.pad_id).sum())


def run(ckpt: str, pack: bool, steps: int, batch_size: int, seq_len: int) -> dict:
    torch.manual_seed(0)
    dm = SFTDataModule(tokenizer=ckpt, pack=pack, seq_len=seq_len, batch_size=batch_size, tinyworld_eval=0)
    model = SFTModule(init_from=ckpt, learning_rate=1e-3, warmup_steps=20)
    counter = RealTokens()
    trainer = Trainer(
        max_steps=steps,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[counter],
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    val = Trainer(precision="bf16-mixed", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm_val = SFTDataModule(tokenizer=ckpt, pack=False, seq_len=seq_len, batch_size=64, tinyworld_eval=0)
    loss = val.validate(model, datamodule=dm_val, verbose=False)[0]["val/loss"]
    return {
        "pack": pack,
        "seconds": seconds,
        "tokens": counter.tokens,
        "tok_s": counter.tokens / seconds,
        "val_loss": loss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretraining checkpoint (configs/pretrain/tiny.yaml)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=256)
    a = p.parse_args()
    rows = [run(a.ckpt, pack, a.steps, a.batch_size, a.seq_len) for pack in (False, True)]
    print("\n| packing | steps | real tokens trained | seconds | real tokens/s | val loss (unpacked) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'on' if r['pack'] else 'off'} | {a.steps} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tok_s']:,.0f} | {r['val_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
