"""Reading and writing lit_llm checkpoints safely.

Every stage stores, under ``checkpoint["lit_llm"]``, the ``ModelConfig`` (as a plain dict), the tokenizer
(as its JSON text) and the stage name, so the next stage needs only the ``.ckpt`` file.

* Reading: ``torch.load(weights_only=True)``: plain tensors and containers only, never pickled code. A file
  that holds a pickled Python object is refused, naming the object.
* Writing: :func:`atomic_save` writes to a temporary file in the same folder, ``fsync``\\ s it and renames it
  over the target (``os.replace``, atomic on POSIX and Windows), so a crash, a kill or a full disk during a
  save leaves the previous checkpoint intact. :class:`AtomicCheckpointIO` makes Lightning save this way; the
  ``lit-llm`` CLI installs it by default. (Lightning's own ``TorchCheckpointIO`` stages the file in the system
  temp folder and *moves* it, which is a copy, not atomic, when that folder is on another file system.)
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_llm.atomic import atomic_save, atomic_save_many  # noqa: F401 - re-exported for callers
from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.errors import CheckpointError, MissingCheckpointError
from lit_llm.tokenizer import Tokenizer

META_KEY = "lit_llm"
# the file of a sharded checkpoint folder that holds everything but the weights and optimizer state (Lightning's)
SHARDED_META = "meta.pt"


def _torch_load(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it contains a pickled Python object{what}, which could run "
            "code when loaded. lit_llm reads checkpoints with torch.load(weights_only=True): tensors and plain "
            "containers only. If you trust the file, load it with torch.load(path, weights_only=False) and "
            "save its tensors again."
        ) from err


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of shards written by the sharded strategy (``FSDP2Strategy``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / SHARDED_META).is_file()


def gather_sharded(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint in a folder of shards as one ordinary checkpoint: whole weights (``state_dict``) and
    everything else the run stored (config, tokenizer, loop state), without the optimizer state (kept
    per parameter name in the folder; a resume reads the folder itself).

    The shards are joined by ``torch.distributed.checkpoint`` into a temporary ``torch.save`` file next to
    the folder, read back with ``weights_only=True`` and deleted: the memory and disk of one whole copy.
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    ckpt = _torch_load(path / SHARDED_META)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gather-") as tmp:
        dcp_to_torch_save(path, Path(tmp) / "whole.pt")
        whole = _torch_load(Path(tmp) / "whole.pt")
    ckpt["state_dict"] = whole["state_dict"]
    return ckpt


def gather_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the sharded checkpoint folder ``path`` as one ``.ckpt`` file ``out`` (atomically)."""
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a folder of checkpoint shards (no .metadata and {SHARDED_META})"
        )
    out = Path(out)
    atomic_save(gather_sharded(path), out)
    return out


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) with a clear error for a missing or bad file.

    A folder of shards (the sharded strategy's checkpoint) is gathered into one (:func:`gather_sharded`).
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return gather_sharded(path)
    if not path.is_file():
        raise MissingCheckpointError(path)
    try:
        return _torch_load(path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the likely cause
        raise CheckpointError(
            f"could not read checkpoint {path} (truncated or not a torch checkpoint?): {err}"
        ) from err


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``lit_llm`` metadata of a checkpoint: ``model_config``, ``tokenizer``, ``stage``."""
    # a folder of shards keeps it beside the weights: no need to gather them
    ckpt = _torch_load(Path(path) / SHARDED_META) if is_sharded_checkpoint(path) else load_checkpoint(path)
    if META_KEY not in ckpt:
        raise CheckpointError(f"{path} is not a lit_llm checkpoint (no '{META_KEY}' entry)")
    return ckpt[META_KEY]


def load_tokenizer(path: str | os.PathLike, chat_template: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a lit_llm ``.ckpt``, of a Hugging Face folder, of a ``.gguf`` file, or a
    ``tokenizer.json``; with ``chat_template`` (a Jinja file) in place of its own template."""
    if str(path).endswith(".ckpt"):
        tok = read_meta(path).get("tokenizer")
        if not tok:
            raise CheckpointError(f"{path} carries no tokenizer")
        tokenizer = Tokenizer.from_str(tok)
    elif str(path).endswith(".gguf"):
        from lit_llm.formats.gguf import import_gguf_tokenizer

        tokenizer = import_gguf_tokenizer(path)
    else:
        tokenizer = Tokenizer.load(path)
    return with_template_file(tokenizer, chat_template)


def with_template_file(tokenizer: Tokenizer, chat_template: str | os.PathLike | None) -> Tokenizer:
    """``tokenizer`` with the chat template read from the Jinja file ``chat_template`` (itself when ``None``)."""
    if chat_template is None:
        return tokenizer
    file = Path(chat_template)
    if not file.is_file():
        raise FileNotFoundError(f"chat template file not found: {file}")
    return tokenizer.with_chat_template(file.read_text(encoding="utf-8"))


def load_backbone(
    path: str | os.PathLike, base: str | os.PathLike | None = None, keep_adapters: bool = False
) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The backbone, tokenizer and metadata stored in a lit_llm checkpoint (read with ``weights_only``),
    or in a Hugging Face folder (``config.json`` + safetensors, from the Hub or ``lit-llm export``) or a
    ``.gguf`` file, each with the tokenizer and chat template it ships (``stage`` ``hf``).

    A LoRA run's checkpoint holds only the adapters (and what else was trained) and names its base
    (``meta["lora"]["base"]``: the base checkpoint's path and :func:`lit_llm.lora.base_fingerprint`); the base
    is loaded from there (or from ``base``), checked against the fingerprint, and the adapters are merged
    into it, unless ``keep_adapters``.

    The model comes back in training mode with gradients on, as a stage wants it; see
    :func:`load_for_inference` for a frozen model.

    Args:
        path: A lit_llm ``.ckpt`` or a Hugging Face folder.
        base: For an adapter checkpoint: load the base from here instead of the path it names (it must have
            the same weights).
        keep_adapters: For an adapter checkpoint: return the model with its (unmerged) ``LoRALinear``
            layers, as :func:`lit_llm.formats.peft.export_peft` wants it.
    """
    if (Path(path).is_dir() and not is_sharded_checkpoint(path)) or str(path).endswith(".gguf"):
        model, tok = import_pretrained(path)
        return model.train(), tok, {"stage": "hf", "model_config": model.config.to_dict()}
    ckpt = load_checkpoint(path)
    if META_KEY not in ckpt:
        raise CheckpointError(f"{path} is not a lit_llm checkpoint (no '{META_KEY}' entry)")
    meta = ckpt[META_KEY]
    prefix = meta.get("backbone_prefix", "model.")
    if meta.get("lora"):
        return _load_adapter(path, ckpt, meta, prefix, base, keep_adapters)
    config = ModelConfig.from_dict(meta["model_config"])
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(model_state(ckpt, prefix), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit its config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, Tokenizer.from_str(meta["tokenizer"]), meta


def _load_adapter(
    path: str | os.PathLike,
    ckpt: dict[str, Any],
    meta: dict[str, Any],
    prefix: str,
    base: str | os.PathLike | None,
    keep_adapters: bool,
) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The base an adapter checkpoint names, checked, with the checkpoint's adapters (merged unless kept)."""
    from lit_llm.lora import LoRAConfig, apply_lora, base_fingerprint, fold_lora

    info = meta["lora"]
    want, named = info["base"]["sha256"], info["base"]["path"]
    source = base if base is not None else named
    if source is None or not Path(source).exists():
        raise CheckpointError(
            f"{path} holds LoRA adapters for the base {named} (sha256 {want[:12]}...), which is not there: "
            "put it back, or pass the path of a checkpoint with the same weights (`--base PATH` to generate / "
            "chat, `base=` in Python)"
        )
    model, _, _ = load_backbone(source)
    got = base_fingerprint(model)
    if got != want:
        raise CheckpointError(
            f"{path} holds LoRA adapters for the base {named} (sha256 {want[:12]}...), but {source} has other "
            f"weights (sha256 {got[:12]}...): adapters only fit the model they were trained on; load them "
            "on that base"
        )
    theirs = ModelConfig.from_dict(meta["model_config"])
    diff = model.config.diff(theirs)
    if diff:
        raise CheckpointError(f"{path}: its base {source} has another model config ({sorted(diff)})")
    apply_lora(model, LoRAConfig.from_any(info["config"]))
    state = model.state_dict()
    saved = model_state(ckpt, prefix)
    unexpected = [k for k in saved if k not in state]
    missing = [k for k in state if k.endswith((".lora_a", ".lora_b")) and k not in saved]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: adapters do not fit their config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    state.update(saved)  # the adapters, and whatever else the run changed (MoE expert biases)
    model.load_state_dict(state)
    if not keep_adapters:
        fold_lora(model)
    model.requires_grad_(True)
    return model.train(), Tokenizer.from_str(meta["tokenizer"]), meta


def import_pretrained(path: str | os.PathLike) -> tuple[Transformer, Tokenizer]:
    """A model from outside lit_llm: a Hugging Face folder or a GGUF file, with the tokenizer it ships."""
    from lit_llm.formats.gguf import import_gguf
    from lit_llm.formats.hf import import_hf

    try:
        if str(path).endswith(".gguf"):
            return import_gguf(path)
        if not (Path(path) / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        model, tok = import_hf(path)
    except CheckpointError:
        raise
    except ValueError as err:  # a family or config we cannot express, weights that do not fit
        raise CheckpointError(str(err)) from None
    if tok is None:
        raise CheckpointError(
            f"{path} has no tokenizer.json: copy the model's tokenizer files (tokenizer.json, "
            "tokenizer_config.json, ...) into the folder"
        )
    return model, tok


# stages whose checkpoints hold a chat policy (``hf``: an exported folder)
CHAT_STAGES = ("sft", "ppo", "grpo", "dpo", "hf")
# stages whose backbone generates text at all (a reward model's backbone was trained to score, not to write)
GENERATIVE_STAGES = ("pretrain", *CHAT_STAGES)


def load_for_inference(
    path: str | os.PathLike,
    precision: Literal["32", "bf16", "int8", "int4"] = "32",
    stages: tuple[str, ...] = GENERATIVE_STAGES,
    base: str | os.PathLike | None = None,
) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """A frozen model (eval mode, no gradients) in the requested precision, its tokenizer and metadata.

    Args:
        path: A lit_llm ``.ckpt`` or an exported Hugging Face folder.
        precision: ``32`` (float32), ``bf16``, or ``int8`` / ``int4`` weight-only quantisation with bfloat16
            activations (``int4``: 4-bit groups of 32 as llama.cpp's Q4_1, the output head int8).
        stages: The kinds of checkpoint the caller can use; any other is refused, naming what it is.
        base: For a LoRA adapter checkpoint, its base (default: the path the checkpoint names); the adapters
            are merged into it.
    """
    from lit_llm.backbone.quantize import quantize_int4, quantize_int8

    model, tok, meta = load_backbone(path, base=base)
    stage = meta.get("stage")
    if stage not in stages:
        hint = {
            "reward": "a reward model scores replies, it does not write them",
            "pretrain": "a pretrained model has not learned the chat template (use lit-llm generate)",
        }.get(stage, "")
        raise CheckpointError(
            f"{path} is a {stage!r} checkpoint; this command needs one of {list(stages)}"
            + (f": {hint}" if hint else "")
        )
    model.eval().requires_grad_(False)
    if precision != "32":
        model.to(torch.bfloat16)
    if precision == "int8":
        quantize_int8(model)
    elif precision == "int4":
        quantize_int4(model)
    return model, tok, meta


def model_state(ckpt: dict[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The backbone weights of a Lightning checkpoint (keys under ``prefix``, prefix stripped)."""
    state = ckpt["state_dict"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that never leaves a half-written checkpoint in place of a good one.

    Local paths are written with :func:`atomic_save`; remote ``fsspec`` URLs (``s3://`` ...) fall back to
    Lightning's own writer. Loading uses ``weights_only=True`` unless the caller asks otherwise, with the
    clear refusal of :func:`load_checkpoint` for a file holding pickled objects.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if not get_filesystem(path).exists(path):
            raise MissingCheckpointError(path)
        if is_sharded_checkpoint(path):  # the sharded strategy reads its folders itself, never through here
            raise CheckpointError(
                f"{path} is a folder of checkpoint shards written by lit_llm.strategies.FSDP2Strategy: resume it "
                "with that strategy (--trainer.strategy lit_llm.strategies.FSDP2Strategy, any number of "
                "processes), or gather the weights into one file (lit-llm export --format ckpt) to start a new run "
                "from them with --model.init_from"
            )
        return _torch_load(path, map_location, weights_only=True if weights_only is None else weights_only)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` (a Trainer argument: ``None``, one plugin or a list) plus :class:`AtomicCheckpointIO`,
    unless a ``CheckpointIO`` is already there (the user's choice wins)."""
    from lightning.fabric.plugins import CheckpointIO

    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in items):
        items.append(AtomicCheckpointIO())
    return items
