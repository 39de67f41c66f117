"""``lit-llm plot``: curves from TensorBoard event files as one PNG, so a run can be looked at without a browser
(and the course's figures are made from the runs' own logs).

    lit-llm plot checkpoints/logs/sft checkpoints/logs/sft-nomask --tags val/loss val/exact_match --out fig.png

Each ``RUN`` is a log folder (``checkpoints/logs/<name>``: its newest ``version_N`` is read), a ``version_N``
folder, or one event file. One panel per tag (a tag may be a glob: ``moe_load/*_max``), one line per run and
tag, labelled with its last value; ``--smooth`` draws a running average over noisy training curves (the raw
curve stays, faint). The last and best value of every curve are printed too.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lit_llm.errors import UserError

# tags whose best value is the largest (accuracies, rewards, throughput); any other tag: the smallest
_HIGHER_IS_BETTER = re.compile(
    r"acc|exact|reward|score|gold|margin|tokens_per_sec|throughput|mfu", re.IGNORECASE
)


@dataclass
class Curve:
    """One scalar tag of one run: steps, values, and seconds since the run's first event."""

    run: str
    tag: str
    steps: list[int]
    values: list[float]
    seconds: list[float]


def event_folder(run: str | Path) -> Path:
    """The folder (or file) whose event files hold ``run``'s scalars: the newest ``version_N`` of a log
    folder, the folder itself when it holds event files, or one event file."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(
            f"no TensorBoard logs at {path}: pass a log folder such as checkpoints/logs/<run> (each "
            "`lit-llm fit` writes one, named after its --trainer.default_root_dir)"
        )
    if any(path.glob("events.out.tfevents.*")):
        return path
    versions = [v for v in path.glob("version_*") if v.is_dir() and v.name[8:].isdigit()]
    if versions:
        return max(versions, key=lambda v: int(v.name[8:]))
    raise UserError(f"{path} holds no TensorBoard event files (events.out.tfevents.*) nor version_N folders")


def read_scalars(run: str | Path, label: str | None = None) -> dict[str, Curve]:
    """Every scalar tag of ``run`` (see :func:`event_folder`), in step order, each curve named ``label``
    (default: :func:`run_name`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    where = event_folder(run)
    acc = EventAccumulator(str(where), size_guidance={"scalars": 0})  # 0: keep every point, no sampling
    acc.Reload()
    name = label if label is not None else run_name(run)
    curves = {}
    events = {tag: acc.Scalars(tag) for tag in acc.Tags().get("scalars", [])}
    t0 = min((e[0].wall_time for e in events.values() if e), default=0.0)
    for tag, evs in events.items():
        evs = sorted(evs, key=lambda e: (e.step, e.wall_time))
        curves[tag] = Curve(
            name, tag, [e.step for e in evs], [e.value for e in evs], [e.wall_time - t0 for e in evs]
        )
    return curves


def run_name(run: str | Path) -> str:
    """A short label for a run: its log folder's name (``checkpoints/logs/sft/version_2`` -> ``sft``)."""
    path = Path(run)
    if path.is_file():
        path = path.parent
    if re.fullmatch(r"version_\d+", path.name):
        path = path.parent
    return path.name or str(run)


def select(curves: dict[str, Curve], pattern: str) -> list[Curve]:
    """The curves whose tag is ``pattern`` or matches it as a glob, in tag order."""
    if pattern in curves:
        return [curves[pattern]]
    return [curves[t] for t in sorted(curves) if fnmatch.fnmatchcase(t, pattern)]


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with debiasing (the first points are not
    pulled toward zero). ``weight`` 0 leaves the values as they are."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight > 0 else v)
    return out


def best(curve: Curve) -> float:
    finite = [v for v in curve.values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if _HIGHER_IS_BETTER.search(curve.tag) else min(finite)


def plot(
    runs: Sequence[str | Path],
    tags: Sequence[str],
    out: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    smooth: float = 0.0,
    x: str = "step",
    log_y: bool = False,
) -> list[Curve]:
    """Draw ``tags`` of ``runs`` into the PNG ``out`` (one panel per tag) and return the curves drawn.

    Args:
        runs: Log folders, ``version_N`` folders or event files.
        tags: Scalar tags, or globs of them; each gets a panel.
        out: The PNG to write (its folder is created; an existing file is replaced atomically).
        labels: One legend label per run (default: the log folder's name).
        title: The figure's title.
        smooth: Running-average weight in ``[0, 1)`` (TensorBoard's slider); 0 draws the raw curves only.
        x: ``step`` (the global step) or ``seconds`` (wall-clock time since the run's first event).
        log_y: A logarithmic y axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lit_llm.atomic import atomic_write

    if not 0 <= smooth < 1:
        raise UserError(f"--smooth must be in [0, 1), got {smooth}")
    if labels is not None and len(labels) != len(runs):
        raise UserError(f"{len(labels)} labels for {len(runs)} runs: give one label per run")
    if x not in ("step", "seconds"):
        raise UserError(f"--x must be step or seconds, got {x!r}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {out}")
    names = list(labels) if labels is not None else [None] * len(runs)
    all_curves = [read_scalars(r, name) for r, name in zip(runs, names)]
    panels: list[tuple[str, list[Curve]]] = []
    for pattern in tags:
        found = [c for curves in all_curves for c in select(curves, pattern)]
        if not found:
            have = sorted({t for curves in all_curves for t in curves})
            raise UserError(
                f"no run has the tag {pattern!r}; the runs log: {', '.join(have) or 'no scalars yet'}"
            )
        panels.append((pattern, found))

    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    drawn = []
    for i, (pattern, found) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, c in enumerate(found):
            xs = c.steps if x == "step" else c.seconds
            color = f"C{j % 10}"
            label = c.run if c.tag == pattern else f"{c.run} {c.tag}"
            label = f"{label} ({c.values[-1]:.4g})"
            if smooth > 0 and len(c.values) > 2:
                ax.plot(xs, c.values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smoothed(c.values, smooth), color=color, linewidth=1.6, label=label)
            else:
                marker = "o" if len(c.values) <= 12 else None
                ax.plot(xs, c.values, color=color, linewidth=1.6, marker=marker, markersize=3, label=label)
            drawn.append(c)
        ax.set_title(pattern, fontsize=10)
        ax.set_xlabel("step" if x == "step" else "seconds")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out, buf.getvalue())
    return drawn


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm plot",
        description="Plot scalar curves of TensorBoard runs into one PNG: one panel per tag, one line per run "
        "(labelled with its last value), and print each curve's last and best value. A run is a log folder "
        "such as checkpoints/logs/sft (its newest version_N is read), a version_N folder or an event file.",
        epilog="example: lit-llm plot checkpoints/logs/sft checkpoints/logs/sft-prompt --tags val/loss "
        "val/exact_match --out sft.png",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="log folders, version_N folders or event files")
    p.add_argument("--tags", nargs="+", default=None, help="scalar tags (or globs: 'moe_load/*_max') to plot")
    p.add_argument("--out", default=None, help="the PNG to write (its folder is created)")
    p.add_argument(
        "--labels", nargs="+", default=None, help="one legend label per run (default: folder names)"
    )
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="running-average weight in [0, 1), as TensorBoard's slider (e.g. 0.8 for training losses)",
    )
    p.add_argument(
        "--x", choices=["step", "seconds"], default="step", help="x axis: global step or wall time"
    )
    p.add_argument("--log_y", action="store_true", help="logarithmic y axis")
    p.add_argument("--list", action="store_true", help="list every run's scalar tags and exit")
    a = p.parse_args(argv)
    if a.list:
        for run in a.runs:
            curves = read_scalars(run)
            print(f"{run} ({event_folder(run)}):")
            for tag, c in sorted(curves.items()):
                print(f"  {tag}  ({len(c.values)} points, last {c.values[-1]:.4g} at step {c.steps[-1]})")
        return
    if not a.tags or not a.out:
        p.error("--tags and --out are required (or --list to see the tags)")
    curves = plot(a.runs, a.tags, a.out, a.labels, a.title, a.smooth, a.x, a.log_y)
    for c in curves:
        print(
            f"{c.run}  {c.tag}: last {c.values[-1]:.4g} (step {c.steps[-1]}), "
            f"best {best(c):.4g}, {len(c.values)} points"
        )
    print(f"wrote {a.out}")
