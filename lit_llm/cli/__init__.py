"""The ``lit-llm`` command.

Training and evaluation go through LightningCLI (:mod:`lit_llm.cli.lightning`)::

    lit-llm fit --config configs/pretrain/tiny.yaml
    lit-llm validate --config configs/pretrain/tiny.yaml --ckpt_path checkpoints/pretrain/last.ckpt

Helpers work from a checkpoint alone, one module each::

    lit-llm generate --ckpt checkpoints/pretrain/last.ckpt --prompt "Alice is in the"
    lit-llm chat | export | pipeline ...

:func:`main` is the Python entry point (it raises); :func:`console_main`, the installed ``lit-llm`` script,
turns a user's mistake (:class:`~lit_llm.errors.UserError`, a missing file) into one ``error: ...`` line and
exit status 2, and leaves the traceback of anything else, which is a bug.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lit_llm.cli.lightning import LitLLMCLI, run_lightning

HELPERS = ("generate", "chat", "serve", "export", "pipeline", "plot")

__all__ = ["HELPERS", "LitLLMCLI", "console_main", "main", "run_lightning"]


def main(args: Sequence[str] | None = None) -> None:
    """Run ``lit-llm`` on ``args`` (``None``: the command line)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in HELPERS:
        importlib.import_module(f"lit_llm.cli.{argv[0]}").main(argv[1:])
        return
    run_lightning(args)


def console_main() -> None:
    """The installed ``lit-llm`` script: :func:`main` with one-line errors for the user's mistakes."""
    import warnings

    from lit_llm.errors import MissingCheckpointError, UserError

    # Lightning 2.6 builds torch's deprecated LeafSpec on every logged step; torch warns the user, who can do
    # nothing about it (the installed script only: the Python API leaves warning filters alone)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
    try:
        main()
    except (UserError, FileNotFoundError, IsADirectoryError) as err:
        message = str(err)
        if isinstance(err, MissingCheckpointError):  # say which command (and course chapter) writes it
            from lit_llm.cli.doc_commands import made_by

            hint = made_by(err.path)
            message += f"; {hint}" if hint else ""
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None
