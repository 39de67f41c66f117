"""The size of every stage's checkpoint, and what is in it: weights by part, optimizer state, frozen models named.

Runs the built-in chain (``lit-llm pipeline --align all``: pretrain -> SFT -> reward -> PPO, GRPO, DPO) in
``--workdir`` unless its checkpoints are there already, then reads each stage's ``last.ckpt``: the file's
bytes, the tensor bytes of each top-level part (tied weights once) of the state dict (``model``, ``critic``, ...), the optimizer
state, and the frozen models the checkpoint names by path and sha256 instead of storing them (DPO's and
PPO's reference, the reward model). "stored before" is what the file would hold if those frozen weights were
stored too, as they were before issue 26.

    python benchmarks/checkpoint_sizes.py                  # the --fast chain (about a minute)
    python benchmarks/checkpoint_sizes.py --full           # the default chain (about 15 minutes on 2 cores)

Prints a Markdown table and writes ``<workdir>/checkpoint_sizes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lit_llm.checkpoint import META_KEY, load_checkpoint

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")
MB = 2**20


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _part_bytes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tensor bytes of each top-level part of a state dict (``model``, ``critic``, ...); a storage shared by
    several keys (tied weights: the head is the embedding) is counted once, as ``torch.save`` stores it."""
    parts: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            parts[key.split(".")[0]] += _tensor_bytes(value)
    return dict(parts)


def measure(path: Path) -> dict:
    """What the checkpoint at ``path`` holds, in bytes."""
    ckpt = load_checkpoint(path)
    parts = _part_bytes(ckpt["state_dict"])
    frozen = {}
    for name, ref in (ckpt.get(META_KEY, {}).get("frozen") or {}).items():
        # the weights the file names instead of storing: the named checkpoint's state dict
        frozen[name] = {
            "path": ref["path"],
            "bytes": sum(_part_bytes(load_checkpoint(ref["path"])["state_dict"]).values()),
        }
    file_bytes = path.stat().st_size
    return {
        "file_bytes": file_bytes,
        "parts": parts,
        "optimizer_bytes": _tensor_bytes(ckpt.get("optimizer_states", [])),
        "frozen": frozen,
        "stored_before_bytes": file_bytes + sum(f["bytes"] for f in frozen.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lit_llm_checkpoint_sizes"))
    p.add_argument("--full", action="store_true", help="the default chain instead of --fast")
    p.add_argument("--rerun", action="store_true", help="run the chain even if its checkpoints exist")
    args = p.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = {s: work / "checkpoints" / s / "last.ckpt" for s in STAGES}
    if args.rerun or not all(p.exists() for p in paths.values()):
        cmd = [sys.executable, "-m", "lit_llm", "pipeline", "--align", "all", "--workdir", str(work)]
        subprocess.run(cmd + ([] if args.full else ["--fast"]), check=True)
    results = {s: measure(paths[s]) for s in STAGES}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    (work / "checkpoint_sizes.json").write_text(json.dumps({"machine": machine, "stages": results}, indent=1))
    print(f"\n{'full' if args.full else '--fast'} chain in {work}; {machine}\n")
    print(
        "| stage | file MB | weights MB (by part) | optimizer MB | frozen, named not stored | stored before MB |"
    )
    print("|---|---:|---|---:|---|---:|")
    for stage, r in results.items():
        parts = ", ".join(f"{k} {v / MB:.2f}" for k, v in r["parts"].items())
        frozen = ", ".join(f"{k} {f['bytes'] / MB:.2f} MB" for k, f in r["frozen"].items()) or "-"
        print(
            f"| {stage} | {r['file_bytes'] / MB:.2f} | {parts} | {r['optimizer_bytes'] / MB:.2f} | {frozen} "
            f"| {r['stored_before_bytes'] / MB:.2f} |"
        )


if __name__ == "__main__":
    main()
