"""Supervised fine-tuning: the masked next-token loss on assistant tokens (with images for a vision model)."""

from __future__ import annotations

from typing import Any

import torch

from lit_llm.errors import CheckpointError, UserError
from lit_llm.losses import IGNORE_INDEX, masked_lm_loss
from lit_llm.stages.base import Stage


class SFTModule(Stage):
    """Instruction tuning from a pretraining checkpoint (``init_from``), or from scratch (``from_scratch``).

    Logs the masked loss, response-token accuracy and, when the DataModule provides held-out prompts and a
    gold scorer (``eval_prompts()`` and ``gold_reward``; tinyworld does: is the answer right?), the mean gold
    score of greedy replies as ``val/exact_match``, the figure later stages improve on.

    Image conversations (a batch with ``images``, from :class:`~lit_llm.data.vision.VisionDataModule`) go
    to the model's vision tower; the ``<|patch|>`` id is linked from the tokenizer into
    ``config.vision.patch_token_id``. Validation then also logs, per question type, the exact-answer rate
    ``val/exact/<type>`` (every answer token and the closing ``<|end|>`` predicted right, which is exactly
    when greedy decoding writes the answer and stops) and ``val/exact_shuffled/<type>``: the same model with
    the images moved one row along the batch, which falls toward the majority-answer baseline when the
    answers come from the images.

    Args:
        eval_max_new_tokens: Reply length limit when scoring held-out prompts.
        from_scratch: Build ``preset`` with fresh weights instead of starting from ``init_from`` (image SFT
            on the built-in image world, whose DataModule trains its own tokenizer).
        (all other arguments: see ``Stage``)
    """

    stage_name = "sft"

    def __init__(self, *args, eval_max_new_tokens: int = 48, from_scratch: bool = False, **kwargs) -> None:
        kwargs.setdefault("learning_rate", 1e-3)
        kwargs.setdefault("warmup_steps", 20)
        super().__init__(*args, **kwargs)
        if self.hparams.init_from is None and not from_scratch:
            raise UserError(
                "SFT starts from a pretrained model: set --model.init_from path/to/pretrain.ckpt "
                "(or --model.from_scratch true to train --model.preset from fresh weights)"
            )
        self.eval_max_new_tokens = eval_max_new_tokens
        self._samples: list[tuple[str, str]] = []
        self._exact: dict[str, list[int]] = {}  # question type -> [right, right with shuffled images, n]

    # ----------------------------------------------------------------------------------------- images
    def setup(self, stage: str) -> None:
        super().setup(stage)
        vision = self.config.vision
        if vision is None or self.tokenizer is None:
            return
        ids = self.tokenizer.image_token_ids()
        if ids is None:
            raise UserError(
                "the model has a vision tower but its tokenizer has no image tokens: use "
                "lit_llm.data.vision.VisionDataModule (it adds them) or Tokenizer.with_image_tokens()"
            )
        patch = ids["<|patch|>"]
        if vision.patch_token_id not in (-1, patch):
            raise CheckpointError(
                f"the model's patch_token_id is {vision.patch_token_id} but the tokenizer's <|patch|> is {patch}"
            )
        vision.patch_token_id = patch
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(dm, "image_size", None)
        per_tile = getattr(dm, "tokens_per_tile", None)
        if size is not None and (size, per_tile) != (vision.image_size, vision.tokens_per_tile):
            raise UserError(
                f"the data makes {size}x{size}-pixel tiles of {per_tile} <|patch|> tokens but the model's vision "
                f"config wants {vision.image_size}x{vision.image_size} tiles of {vision.tokens_per_tile}: set "
                "--data.image_size / --data.patch_size / --data.pixel_shuffle_ratio to the model's"
            )

    def forward_batch(self, batch: dict[str, Any], images: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)`` of a batch; ``images`` replaces the batch's own tiles when given."""
        images = batch.get("images") if images is None else images
        extra = {"images": images} if images is not None else {}
        return self.model(batch["input_ids"], batch.get("positions"), batch.get("attn_mask"), **extra)

    # --------------------------------------------------------------------------------------- training
    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits = self.forward_batch(batch)  # (B, T, V)
        loss, acc = masked_lm_loss(logits, batch["labels"])
        on_step = stage == "train"
        # the batch holds lists (question types, answers) beside tensors: name its size for epoch means
        n = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=n)
        self.log(f"{stage}/token_acc", acc, on_step=on_step, on_epoch=not on_step, batch_size=n)
        if stage != "train" and "qtypes" in batch:
            self.count_exact(batch, logits)
        if on_step:  # several processes: the mean over the labelled tokens of the global batch
            return loss * self.token_weight(batch["labels"] != IGNORE_INDEX)
        return loss

    @torch.no_grad()
    def count_exact(self, batch: dict[str, Any], logits: torch.Tensor) -> None:
        """Add this batch's exact answers per question type, with its own and with shuffled images."""
        right = exact_rows(logits, batch["labels"])
        shuffled = torch.zeros_like(right)
        images = shuffle_images(batch["images"], batch["tiles_per_row"])
        if images is not None:
            shuffled = exact_rows(self.forward_batch(batch, images), batch["labels"])
        for t, r, s in zip(batch["qtypes"], right.tolist(), shuffled.tolist()):
            counts = self._exact.setdefault(t, [0, 0, 0])
            counts[0] += r
            counts[1] += s
            counts[2] += 1

    def on_validation_epoch_start(self) -> None:
        self._exact.clear()

    def on_validation_epoch_end(self) -> None:
        self.log_gold_score(self.eval_max_new_tokens)
        if self.trainer.sanity_checking:
            return
        exact = self._exact
        if self.trainer.world_size > 1:
            # every rank holds a shard of the validation set, with its own question types (or none): add up
            # the counts of every rank's types (a reduce of per-rank tensors would pair different types, or
            # wait forever for a rank that has none)
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, exact)
            exact = {}
            for part in parts:
                for t, c in part.items():
                    exact[t] = [a + b for a, b in zip(exact.get(t, [0, 0, 0]), c)]
        if not exact:
            return
        types = sorted(exact)
        counts = torch.tensor([exact[t] for t in types], dtype=torch.float64)
        total = counts.sum(0)
        self.log("val/exact", total[0] / total[2], prog_bar=True, rank_zero_only=True)
        self.log("val/exact_shuffled", total[1] / total[2], rank_zero_only=True)
        for t, (r, s, n) in zip(types, counts.tolist()):
            self.log(f"val/exact/{t}", r / n, rank_zero_only=True)
            self.log(f"val/exact_shuffled/{t}", s / n, rank_zero_only=True)

    def sample_texts(self) -> list[tuple[str, str]]:
        return self._samples

    @torch.no_grad()
    def image_samples(self, examples: list[dict], max_new_tokens: int = 8) -> list[dict]:
        """Greedy replies to image questions (``VisionDataModule`` examples): ``[{"tiles", "question",
        "answer", "reply"}, ...]`` for the TensorBoard picture grid (``VisionSampleCallback``)."""
        from lit_llm.backbone.generate import generate
        from lit_llm.data.images import normalize

        if not examples or self.tokenizer is None:
            return []
        tok = self.tokenizer
        was_training = self.model.training
        self.model.eval()
        try:
            out = generate(
                self.model,
                [e["input_ids"][: e["prompt_len"]] for e in examples],
                max_new_tokens,
                stop_tokens=tok.stop_ids,
                pad_id=tok.pad_id,
                images=normalize(torch.cat([e["tiles"] for e in examples])).to(self.device),
            )
        finally:
            self.model.train(was_training)
        return [
            {
                "tiles": e["tiles"],
                "question": e["question"],
                "answer": e["answer"],
                "reply": tok.decode(r).strip(),
            }
            for e, r in zip(examples, out.response_lists())
        ]


def exact_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, 1 when the argmax is right at every labelled position (0 for a row without labels)."""
    labelled = labels != IGNORE_INDEX
    wrong = (logits.argmax(-1) != labels) & labelled
    return (~wrong.any(-1) & labelled.any(-1)).long()


def shuffle_images(images: torch.Tensor, tiles_per_row: torch.Tensor) -> torch.Tensor | None:
    """The tiles of row ``i`` given to row ``i + 1`` (the last row's to row 0), or ``None`` when that is
    not possible: a single row, or rows with different numbers of tiles."""
    B = len(tiles_per_row)
    if B < 2 or bool((tiles_per_row != tiles_per_row[0]).any()):
        return None
    return images.unflatten(0, (B, -1)).roll(1, dims=0).flatten(0, 1)
