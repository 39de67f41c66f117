"""The shell commands written in the README and the course (``docs/course/*.md``), read as
``tests/test_doc_commands.py`` runs them, and the question a user asks when a command's input is missing:
which command, in which chapter, writes this checkpoint?

A command is a line (``\\``-continued lines joined) of a ```` ```bash ```` block; ``#`` starts a comment;
``a && b`` is two commands. Nothing here runs anything.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source checkout (an editable install); may not exist
_FENCE = re.compile(r"^\s*```(\S*)\s*$")


@dataclass
class DocCommand:
    """One command of a Markdown file: where it is written, its text and its words."""

    file: Path
    line: int  # 1-based line of the command's first line
    chapter: str  # the file's first "# " heading
    text: str
    argv: list[str]

    @property
    def where(self) -> str:
        return f"{self.file.as_posix()}:{self.line}"


def read_commands(md: str | Path) -> list[DocCommand]:
    """Every command of the ```` ```bash ```` (or ``sh``/``shell``) blocks of the Markdown file ``md``."""
    md = Path(md)
    lines = md.read_text(encoding="utf-8").splitlines()
    chapter = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), md.stem)
    out: list[DocCommand] = []
    in_block, pending, start = False, "", 0
    for i, raw in enumerate(lines, 1):
        fence = _FENCE.match(raw)
        if fence:
            in_block = not in_block and fence.group(1) in ("bash", "sh", "shell", "console")
            pending = ""
            continue
        if not in_block:
            continue
        if not pending:
            start = i
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = (pending + stripped).strip(), ""
        for part in re.split(r"\s&&\s", text):
            argv = shlex.split(part, comments=True)
            if argv:
                out.append(DocCommand(md, start, chapter, part.split(" #")[0].strip(), argv))
    return out


def course_files(root: str | Path | None = None) -> list[Path]:
    """The course's chapters in order (``docs/course/NN-*.md``) under ``root`` (default: the working directory,
    then the source checkout)."""
    for base in [Path(root)] if root is not None else [Path.cwd(), REPO]:
        files = sorted((base / "docs" / "course").glob("[0-9][0-9]-*.md"))
        if files:
            return files
    return []


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name value`` / ``--name=value`` in ``argv`` (the last one given), else ``None``."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def _config_root_dir(config: str, base: Path) -> str | None:
    """``trainer.default_root_dir`` of a stage YAML (the shallow line a stage file writes), else ``None``."""
    path = Path(config) if Path(config).is_absolute() else base / config
    if not path.is_file():
        return None
    found = re.search(r"^\s+default_root_dir:\s*(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
    return found.group(1) if found else None


def outputs(cmd: DocCommand, base: Path) -> list[str]:
    """The paths ``cmd`` writes, as written in the docs (relative to where the command runs): a training run's
    folder and its ``last.ckpt``, an export's ``--out``, a plot's PNG, a download's folder."""
    argv = cmd.argv
    if argv[:1] == ["lit-llm"] and len(argv) > 1:
        if argv[1] == "fit":
            root = option(argv, "--trainer.default_root_dir")
            if root is None:  # the last --config file that sets it
                configs = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "--config"]
                found = [r for r in (_config_root_dir(c, base) for c in configs) if r]
                root = found[-1] if found else None
            return [] if root is None else [root, f"{root}/last.ckpt"]
        if argv[1] in ("export", "plot"):
            out = option(argv, "--out")
            return [] if out is None else [out]
        return []
    if argv[:2] == ["pip", "download"] or argv[:1] == ["unzip"]:
        dest = option(argv, "-d")
        return [] if dest is None else [dest]
    return []


def _norm(path: str) -> str:
    return Path(path).as_posix().removeprefix("./").rstrip("/")


def made_by(path: str | Path, root: str | Path | None = None) -> str | None:
    """Which documented command writes ``path``: the first course chapter's command whose output is ``path``
    (or a folder above it), else a shipped config whose ``default_root_dir`` holds it; ``None`` when none.

    Args:
        path: The missing file or folder, as the user gave it (relative to the working directory).
        root: Where ``docs/course`` and ``configs/`` are (default: the working directory, then the checkout).
    """
    want = _norm(str(path))
    bases = [Path(root)] if root is not None else [Path.cwd(), REPO]

    def covers(out: str) -> bool:
        out = _norm(out)
        return want == out or want.startswith(out + "/")

    for chapter in course_files(root):
        base = chapter.parents[2]
        for cmd in read_commands(chapter):
            if any(covers(o) for o in outputs(cmd, base)):
                rel = chapter.relative_to(base).as_posix()
                return f"it is written by `{cmd.text}` in the course's chapter '{cmd.chapter}' ({rel}): run that first"
    for base in bases:
        if (base / "README.md").is_file():
            for cmd in read_commands(base / "README.md"):
                if any(covers(o) for o in outputs(cmd, base)):
                    return f"it is written by `{cmd.text}` (README.md, line {cmd.line}): run that first"
        for config in sorted((base / "configs").glob("*/*.yaml")):
            out = _config_root_dir(str(config), base)
            if out and covers(out):
                rel = config.relative_to(base).as_posix()
                return f"it is written by `lit-llm fit --config {rel}`: run that first"
    return None
