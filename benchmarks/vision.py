"""Llama 4 vision, learning and cost: does the model answer from the image, and what does a step cost?

Trains the shipped config (``--train``: ``lit-llm fit --config configs/vision/shapes.yaml`` in ``--workdir``,
timed) or takes a checkpoint (``--ckpt``), then, on ``--n`` questions about held-out test scenes of the
image world (never seen in training or validation):

* exact answers per question type (greedy decoding writes the answer and stops; computed by teacher forcing,
  which is the same thing: see ``lit_llm.stages.sft.exact_rows``), beside
* the majority-answer baseline (the most common training answer of the type, always given), and
* the same model with the images shuffled across the batch (row i gets row i+1's image): if the answers come
  from the image, this falls to about the baseline;

and exact answers per wording (colour of a shape in a place / of a named shape, ...); ``--split train``
asks about training scenes instead (a model that memorised its scenes scores higher there).

Then the cost of one training step (forward, backward, and the optimizer the checkpoint was trained with:
AdamW or Muon) on a training batch: tokens/s, and the share of the step spent in the vision tower (its
forward + backward alone on the same tiles, timed in the same loop, alternating). Medians of ``--reps``.

    OMP_NUM_THREADS=1 python benchmarks/vision.py --train --workdir /tmp/vision-bench
    OMP_NUM_THREADS=1 python benchmarks/vision.py --ckpt checkpoints/vision/last.ckpt
    python benchmarks/vision.py --train --workdir /tmp/seed1 -- --seed_everything 1 --data.seed 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_llm.checkpoint import load_backbone
from lit_llm.data import images as world
from lit_llm.data.vision import VisionDataModule, collate_images
from lit_llm.losses import IGNORE_INDEX, masked_lm_loss
from lit_llm.optim import build_optimizer
from lit_llm.stages.sft import exact_rows, shuffle_images

ROOT = Path(__file__).resolve().parents[1]


def train(workdir: Path, extra: list[str]) -> tuple[Path, float]:
    """Run the shipped config in ``workdir``; the checkpoint and the wall-clock seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lit_llm", "fit", "--config", str(ROOT / "configs/vision/shapes.yaml")]
    cmd += ["--trainer.enable_progress_bar", "false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, env=env, check=True)
    return workdir / "checkpoints/vision/last.ckpt", time.perf_counter() - t0


def data_for(ckpt: Path, model) -> VisionDataModule:
    v = model.config.vision
    return VisionDataModule(
        tokenizer=str(ckpt),
        image_size=v.image_size,
        patch_size=v.patch_size,
        pixel_shuffle_ratio=v.pixel_shuffle_ratio,
    )


WORDINGS = (  # (question prefix, name): the first match names a question's wording
    ("What color is the shape in the", "colour of the shape in a place"),
    ("What color is the", "colour of a named shape"),
    ("How many shapes are", "how many shapes"),
    ("How many", "how many of a colour"),
    ("Where is the", "where is a shape"),
    ("Is there a", "is there a shape"),
)


def wording(question: str) -> str:
    return next((name for prefix, name in WORDINGS if question.startswith(prefix)), "other")


@torch.no_grad()
def evaluate(
    model, dm: VisionDataModule, n: int, batch_size: int, split: str = "test"
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per question type: [exact, exact with shuffled images, majority baseline, count]; per wording:
    [exact, count]. ``split="train"`` asks about training scenes instead (memorised or learned?)."""
    examples = dm.test_examples(n) if split == "test" else dm.tokenize(dm.shapes_items(split, n), split)
    by_wording: dict[str, list[int]] = {}
    majority = world.majority_answers(world.questions(dm.shapes_sizes[0], "train", dm.shapes, images=False))
    out: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        b = collate_images(part, dm.tokenizer.pad_id)
        own = exact_rows(model(b["input_ids"], images=b["images"]), b["labels"])
        shuffled_images = shuffle_images(b["images"], b["tiles_per_row"])
        shuffled = exact_rows(model(b["input_ids"], images=shuffled_images), b["labels"])
        for e, r, s in zip(part, own.tolist(), shuffled.tolist()):
            row = out.setdefault(e["qtype"], [0, 0, 0, 0])
            row[0] += r
            row[1] += s
            row[2] += e["answer"] == majority.get(e["qtype"])
            row[3] += 1
            w = by_wording.setdefault(wording(e["question"]), [0, 0])
            w[0] += r
            w[1] += 1
    return out, by_wording


@torch.no_grad()
def evaluate_follow_ups(model, dm: VisionDataModule, n: int, batch_size: int) -> dict[str, list[int]]:
    """Exact answers to a second question about the same test board (the first question and its answer
    given as the conversation so far; only the second answer scored), per wording: [exact, count]."""
    items = [it for it in dm.shapes_items("test", n, follow_ups=1) if len(it["messages"]) == 4]
    examples = dm.tokenize(items, "test")
    if len(examples) != len(items):  # the zip below pairs them by position
        raise SystemExit(f"{len(items) - len(examples)} follow-up conversations exceed seq_len {dm.seq_len}")
    for e, it in zip(examples, items):
        labelled = [i for i, t in enumerate(e["labels"]) if t != IGNORE_INDEX]
        # the first answer's tokens are the first labelled run; keep only the second answer's
        second = [i for i, j in zip(labelled[1:], labelled) if i != j + 1][0]
        e["labels"] = [IGNORE_INDEX if i < second else t for i, t in enumerate(e["labels"])]
        e["follow_up"] = it["messages"][2]["content"]
    out: dict[str, list[int]] = {}
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        b = collate_images(part, dm.tokenizer.pad_id)
        own = exact_rows(model(b["input_ids"], images=b["images"]), b["labels"])
        for e, r in zip(part, own.tolist()):
            row = out.setdefault(wording(e["follow_up"]), [0, 0])
            row[0] += r
            row[1] += 1
    return out


def step_cost(
    model, dm: VisionDataModule, batch_size: int, reps: int, optimizer: str = "adamw"
) -> tuple[float, float, float]:
    """(tokens/s of a training step with the run's ``optimizer``, its seconds, the vision tower's share)."""
    dm.batch_size = batch_size
    examples = dm.tokenize(dm.shapes_items("train", batch_size), "train")
    b = collate_images(examples, dm.tokenizer.pad_id)
    model.train()
    opt = build_optimizer(model, optimizer, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95))
    full, tower = [], []
    for _ in range(reps + 1):  # the first of each is a warm-up
        t0 = time.perf_counter()
        loss, _ = masked_lm_loss(model(b["input_ids"], images=b["images"]), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.vision(b["images"]).sum().backward()
        tower.append(time.perf_counter() - t0)
        opt.zero_grad()
    step, vis = statistics.median(full[1:]), statistics.median(tower[1:])
    return b["input_ids"].numel() / step, step, vis / step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="a trained vision checkpoint (else --train)")
    p.add_argument("--train", action="store_true", help="train the shipped config first, timed")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vision-bench"))
    p.add_argument("--n", type=int, default=1000, help="held-out test questions")
    p.add_argument(
        "--split",
        choices=["test", "train", "val"],
        default="test",
        help="scenes to ask about (train: memorised?)",
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("fit_args", nargs="*", help="extra lit-llm fit arguments for --train")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    ckpt, seconds = a.ckpt, None
    if a.train:
        ckpt, seconds = train(a.workdir, a.fit_args)
    if ckpt is None:
        p.error("give --ckpt or --train")
    model, _, _ = load_backbone(ckpt)
    model.eval()
    dm = data_for(ckpt, model)
    res, by_wording = evaluate(model, dm, a.n, a.batch_size, a.split)
    print(f"checkpoint {ckpt}" + (f", trained in {seconds:.0f} s" if seconds is not None else ""))
    print(f"{a.split} scenes")
    print("| question type | n | exact | images shuffled | majority baseline |")
    print("|---|---:|---:|---:|---:|")
    tot = [0, 0, 0, 0]
    for t in world.QUESTION_TYPES:
        r, s, m, n = res.get(t, [0, 0, 0, 0])
        tot = [x + y for x, y in zip(tot, (r, s, m, n))]
        if n:
            print(f"| {t} | {n} | {r / n:.1%} | {s / n:.1%} | {m / n:.1%} |")
    r, s, m, n = tot
    print(f"| all | {n} | {r / n:.1%} | {s / n:.1%} | {m / n:.1%} |")
    print("\n| wording | n | exact |\n|---|---:|---:|")
    for _, name in WORDINGS:
        r, n = by_wording.get(name, [0, 0])
        if n:
            print(f"| {name} | {n} | {r / n:.1%} |")
    follow = evaluate_follow_ups(model, dm, a.n, a.batch_size)
    r, n = (sum(v[i] for v in follow.values()) for i in (0, 1))
    print(f"\nsecond question about the same board (chat), exact: {r / n:.1%} of {n}: ", end="")
    print(
        ", ".join(f"{name} {follow[name][0] / follow[name][1]:.0%}" for _, name in WORDINGS if name in follow)
    )
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    optimizer = hparams.get("optimizer", "adamw")
    tps, step, share = step_cost(model, dm, a.batch_size, a.reps, optimizer)
    print(
        f"training step ({optimizer}, batch {a.batch_size}, {torch.get_num_threads()} thread(s)): "
        f"{step * 1000:.0f} ms, "
        f"{tps:.0f} tokens/s; vision tower forward+backward alone: {share:.0%} of the step"
    )


if __name__ == "__main__":
    main()
