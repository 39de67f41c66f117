"""The model configuration: one typed dataclass, derived values in ``__post_init__``, named presets.

Every knob of the backbone lives here as a plain value (ints, floats, strings, bools), so a config can be
written to YAML, stored inside a checkpoint and compared for equality. ``ModelConfig.from_name("tiny")``
gives a preset; keyword overrides replace any field::

    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=300)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class ModelConfig:
    """Shape and flavour of the decoder-only transformer.

    Args:
        name: A label (the preset name when built with ``from_name``).
        vocab_size: Number of token ids; normally linked from the tokenizer, never typed by hand.
        block_size: Longest sequence the model is built for (positions, caches).
        n_layer: Number of transformer blocks.
        n_embd: Width of the residual stream.
        n_head: Number of query heads.
        n_kv_head: Number of key/value heads (grouped-query attention); ``None`` means ``n_head`` (plain MHA).
        head_dim: Width of one head; ``None`` means ``n_embd // n_head``.
        intermediate_size: Hidden width of the MLP; ``None`` derives it (4x for GELU, about 8/3x for SwiGLU).
        multiple_of: Round a derived SwiGLU width up to this multiple.
        norm: ``rmsnorm`` (Llama) or ``layernorm`` (GPT-2).
        norm_eps: Epsilon of the normalisation layers.
        mlp: ``swiglu`` (Llama) or ``gelu`` (GPT-2).
        pos: ``rope`` (rotary, Llama) or ``learned`` (absolute position embeddings, GPT-2).
        rope_theta: RoPE base.
        rope_scaling_factor: Llama-3-style frequency scaling factor; ``None`` disables the scaling.
        rope_low_freq_factor: Llama-3 scaling: wavelengths above ``original/low_freq_factor`` are divided by
            the factor.
        rope_high_freq_factor: Llama-3 scaling: wavelengths below ``original/high_freq_factor`` are kept.
        rope_original_max_seq_len: Llama-3 scaling: the context length the model was first trained at.
        bias: Biases in the linear layers (GPT-2 style) or not (Llama).
        tie_embeddings: Share the token embedding with the output head.
        dropout: Dropout on attention weights, residual branches and embeddings.
        init_std: Standard deviation of the normal initialisation.
    """

    name: str = "custom"
    vocab_size: int = 512
    block_size: int = 256
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    multiple_of: int = 8
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    pos: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig({self.name!r}): {msg}")

        for key in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head"):
            need(int(getattr(self, key)) > 0, f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            need(
                self.n_embd % self.n_head == 0,
                f"n_head={self.n_head} must divide n_embd={self.n_embd} (or set head_dim explicitly)",
            )
            self.head_dim = self.n_embd // self.n_head
        need(self.n_kv_head > 0, f"n_kv_head must be positive, got {self.n_kv_head}")
        need(
            self.n_head % self.n_kv_head == 0,
            f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (grouped-query attention)",
        )
        need(
            self.head_dim % 2 == 0 or self.pos != "rope", f"RoPE needs an even head_dim, got {self.head_dim}"
        )
        need(
            self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"
        )
        need(self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        need(self.pos in ("rope", "learned"), f"pos must be 'rope' or 'learned', got {self.pos!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.intermediate_size is None:
            if self.mlp == "gelu":
                self.intermediate_size = 4 * self.n_embd
            else:
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = self.multiple_of * -(-hidden // self.multiple_of)

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a named preset, with keyword overrides.

        Raises:
            ValueError: if the name is not a preset (the message lists the ones that exist).
        """
        if name not in PRESETS:
            raise ValueError(
                f"unknown model preset {name!r}; available presets: {', '.join(sorted(PRESETS))}"
            )
        values = {**PRESETS[name], **overrides}
        values.setdefault("name", name)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def diff(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{field: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k != "name" and a[k] != b[k]}


PRESETS: dict[str, dict[str, Any]] = {
    # about 1M parameters with a 512-token BPE vocabulary: the CPU default, trains in minutes.
    "tiny": dict(vocab_size=512, block_size=256, n_layer=4, n_embd=128, n_head=4, n_kv_head=2),
    # nanoGPT's CPU example (shakespeare_char "baby GPT" at width 128), modern flavour; classic via overrides.
    "gpt-char-baby": dict(
        vocab_size=65, block_size=64, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, intermediate_size=336
    ),
    # 12M parameters at vocab 8192.
    "small": dict(vocab_size=8192, block_size=512, n_layer=6, n_embd=384, n_head=6, n_kv_head=2),
    # GPT-2-small sized Llama for one GPU.
    "llama-125m": dict(
        vocab_size=32000, block_size=2048, n_layer=12, n_embd=768, n_head=12, n_kv_head=4, rope_theta=500000.0
    ),
    # GPT-2 classic: LayerNorm, GELU, learned positions, biases; compare against "gpt-char-baby".
    "gpt2-char-baby": dict(
        vocab_size=65,
        block_size=64,
        n_layer=4,
        n_embd=128,
        n_head=4,
        norm="layernorm",
        mlp="gelu",
        pos="learned",
        bias=True,
    ),
}
