"""``lit-llm plot``: TensorBoard scalars read back exactly, drawn into a PNG, and clear errors."""

from __future__ import annotations

import pytest
from PIL import Image

from lit_llm.cli.plot import best, event_folder, main, plot, read_scalars, smoothed
from lit_llm.errors import UserError


def _write(folder, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            w.add_scalar(tag, value, step)
    w.close()


@pytest.fixture
def logs(tmp_path):
    run = tmp_path / "logs" / "sft"
    _write(run / "version_0", {"val/loss": [(0, 9.0)]})  # an older run: not read
    _write(
        run / "version_1",
        {
            "val/loss": [(10, 2.0), (0, 3.0), (20, 1.5)],
            "moe_load/layer0_max": [(0, 2.0)],
            "moe_load/layer1_max": [(0, 3.0)],
        },
    )
    other = tmp_path / "logs" / "sft-prompt"
    _write(
        other / "version_0", {"val/loss": [(0, 3.5), (20, 2.5)], "val/exact_match": [(20, 0.25), (10, 0.5)]}
    )
    return run, other


def test_reads_the_newest_version_in_step_order(logs):
    run, _ = logs
    assert event_folder(run).name == "version_1"
    c = read_scalars(run)["val/loss"]
    assert c.steps == [0, 10, 20] and c.values == [3.0, 2.0, 1.5]
    assert c.run == "sft" and min(c.seconds) >= 0


def test_plot_writes_a_png_with_one_panel_per_tag(logs, tmp_path):
    run, other = logs
    out = tmp_path / "figs" / "sft.png"  # the folder is created
    curves = plot(
        [run, other], ["val/loss", "moe_load/*_max"], out, labels=["masked", "all tokens"], smooth=0.5
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height > 100  # two panels side by side
    assert [(c.run, c.tag) for c in curves] == [
        ("masked", "val/loss"),
        ("all tokens", "val/loss"),
        ("masked", "moe_load/layer0_max"),
        ("masked", "moe_load/layer1_max"),
    ]


def test_missing_tag_lists_what_the_runs_log(logs, tmp_path):
    run, _ = logs
    with pytest.raises(UserError, match=r"no run has the tag 'val/acc'.*val/loss"):
        plot([run], ["val/acc"], tmp_path / "x.png")
    with pytest.raises(UserError, match="no TensorBoard logs at"):
        plot([tmp_path / "nowhere"], ["val/loss"], tmp_path / "x.png")
    with pytest.raises(UserError, match="one label per run"):
        plot([run], ["val/loss"], tmp_path / "x.png", labels=["a", "b"])
    assert not (tmp_path / "x.png").exists()


def test_smoothing_is_tensorboards_debiased_average():
    # weight 0.5: avg1 = 0.5 * 1 -> 1 / (1 - 0.5) = 1; avg2 = 0.25 + 0.5 * 2 = 1.25 -> / 0.75 = 5/3
    assert smoothed([1.0, 2.0], 0.5) == pytest.approx([1.0, 5 / 3])
    assert smoothed([1.0, 2.0], 0.0) == [1.0, 2.0]


def test_best_is_the_max_of_accuracies_and_the_min_of_losses(logs):
    _, other = logs
    curves = read_scalars(other)
    assert best(curves["val/exact_match"]) == 0.5 and best(curves["val/loss"]) == 2.5


def test_cli_prints_last_and_best(logs, tmp_path, capsys):
    run, other = logs
    main([str(run), str(other), "--tags", "val/loss", "--out", str(tmp_path / "f.png")])
    out = capsys.readouterr().out
    assert "sft  val/loss: last 1.5 (step 20), best 1.5, 3 points" in out
    assert "sft-prompt  val/loss: last 2.5 (step 20), best 2.5" in out and (tmp_path / "f.png").is_file()
    main([str(other), "--list"])
    assert "val/exact_match  (2 points, last 0.25 at step 20)" in capsys.readouterr().out
