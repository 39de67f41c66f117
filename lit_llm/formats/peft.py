"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) from a model carrying our
:class:`~lit_llm.lora.LoRALinear` adapters, in the names and row layout of the Hugging Face export of its base."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_llm.lora import lora_layers


def _hf_module_names(config: Any, arch: str) -> dict[str, str]:
    """Our qualified linear names -> Hugging Face module names (``model.layers.0.self_attn.q_proj``)."""
    from lit_llm.formats.llama import _ATTN_NAMES, _BLOCK_NAMES, _DENSE_NAMES, _MOE_NAMES

    out = {}
    for i in range(config.n_layer):
        if arch == "llama":
            names = _BLOCK_NAMES
        else:
            mlp = _MOE_NAMES if config.is_moe_layer(i) else _DENSE_NAMES
            names = {**_ATTN_NAMES, **{k: f"feed_forward.{v}" for k, v in mlp.items()}}
        for ours, theirs in names.items():
            if ours.endswith(".weight"):
                out[f"layers.{i}.{ours[: -len('.weight')]}"] = f"model.layers.{i}.{theirs[: -len('.weight')]}"
    return out


def peft_state_dict(model: nn.Module, arch: str = "auto") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapters in PEFT's names and Hugging Face's layout, and the adapted HF module names.

    ``lora_a`` becomes ``base_model.model.<hf module>.lora_A.weight`` as it is; ``lora_b`` becomes
    ``...lora_B.weight`` with its rows in the order ``lit_llm.formats.hf`` gives the base weight's rows (Llama 4
    permutes the rows of RoPE layers' ``q_proj`` / ``k_proj`` within each head): the adapter's output side
    must line up with the exported base weight. The rows are reordered by ``lit_llm.formats.hf.state_dict_to_hf``
    itself, applied to a state dict whose targeted weights are replaced by their ``B``, so they always
    follow the conversion.
    """
    from lit_llm.formats.hf import _resolve, state_dict_to_hf

    config = model.config
    kind = _resolve(config, arch)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    if any(m.merged for m in layers.values()):
        raise ValueError("adapters are merged into the weights: unmerge_lora(model) before exporting them")
    names = _hf_module_names(config, kind)
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))}
    for name, m in layers.items():
        state[f"{name}.weight"] = m.lora_b.detach()
    hf_b = state_dict_to_hf(state, config, kind)
    out, modules = {}, []
    for name, m in layers.items():
        theirs = names[name]
        modules.append(theirs)
        out[f"base_model.model.{theirs}.lora_A.weight"] = m.lora_a.detach()
        out[f"base_model.model.{theirs}.lora_B.weight"] = hf_b[f"{theirs}.weight"]
    return out, modules


def export_peft(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    arch: str = "auto",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a PEFT LoRA adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` then computes
    what ``model`` computes, where ``base`` is ``lit_llm.formats.hf.export_hf`` of the same base model and ``arch``.

    Args:
        model: A ``Transformer`` carrying (unmerged) LoRA adapters.
        out_dir: Destination folder (created; the two files are replaced atomically).
        base_model_name_or_path: Written into the config for ``AutoPeftModelForCausalLM`` (e.g. the folder
            of the exported base).
        arch: ``llama``, ``llama4`` or ``auto``, as given to ``export_hf`` for the base.
        dtype: Store the adapters in this dtype (default: theirs).
    """
    from safetensors.torch import save

    from lit_llm.atomic import atomic_save_many

    layers = lora_layers(model)
    state, modules = peft_state_dict(model, arch)
    first = next(iter(layers.values()))
    rank = first.lora_a.shape[0]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": first.scaling * rank,
        "lora_dropout": dropout,
        # full module names: PEFT matches a name exactly or by suffix, so each adapted layer is named once
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {k: v.to("cpu", dtype or v.dtype).contiguous().clone() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_many(
        [
            (
                tensors,
                out / "adapter_model.safetensors",
                lambda t, f: f.write(save(t, metadata={"format": "pt"})),
            ),
            (
                json.dumps(config, indent=2) + "\n",
                out / "adapter_config.json",
                lambda t, f: f.write(t.encode()),
            ),
        ]
    )
    return out
