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
        moe_n_expert: Routed experts per Mixture-of-Experts layer; ``0`` makes every layer a dense MLP.
        moe_top_k: Experts each token is sent to.
        moe_every: MoE on every ``moe_every``-th layer (layers ``moe_every - 1, 2 * moe_every - 1, ...``,
            Hugging Face Llama 4's ``interleave_moe_layer_step``); dense SwiGLU on the others.
        moe_intermediate_size: Hidden width of one expert (and of the shared expert); ``None`` means
            ``intermediate_size``.
        moe_shared_expert: Add an always-on SwiGLU expert to every MoE layer (Llama 4).
        moe_score: ``softmax`` over all experts (Switch, Mixtral) or ``sigmoid`` of each chosen logit
            (Llama 4).
        moe_renormalize: Softmax scoring only: rescale the top-k probabilities to sum to one (Mixtral).
        moe_weight_input: Multiply an expert's input by its gate instead of its output (Llama 4).
        moe_bias_update: Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the scores
            for the top-k choice only, moved by ``MoE.update_bias`` toward equal load.
        moe_aux_loss_coef: Weight of the Switch load-balancing loss in ``moe_aux_losses(model)["loss"]``.
        moe_z_loss_coef: Weight of the router z-loss in ``moe_aux_losses(model)["loss"]``.
        nope_every: Every ``nope_every``-th layer (layers ``nope_every - 1, 2 * nope_every - 1, ...``) has no
            RoPE and attends globally (Llama 4 "iRoPE", Hugging Face's ``no_rope_layer_interval``); ``0`` means
            RoPE everywhere. The other layers are the "local" layers.
        attention_chunk_size: Local layers: a query attends only keys in its own chunk of positions
            (``key_pos // size == query_pos // size``); ``None`` disables chunking.
        sliding_window: Local layers: a query attends only the ``sliding_window`` most recent positions
            (itself included); ``None`` disables the window.
        qk_norm: Local layers: RMS-normalise queries and keys (no weight, ``norm_eps``) after RoPE.
        attn_temperature_tuning: NoPE layers: scale queries by ``log(floor((pos + 1) / attn_floor_scale) + 1)
            * attn_scale + 1`` (Llama 4), sharpening attention far into long contexts.
        attn_floor_scale: Temperature tuning: positions per step of the logarithm.
        attn_scale: Temperature tuning: strength.
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
    moe_n_expert: int = 0
    moe_top_k: int = 1
    moe_every: int = 1
    moe_intermediate_size: int | None = None
    moe_shared_expert: bool = True
    moe_score: Literal["softmax", "sigmoid"] = "softmax"
    moe_renormalize: bool = False
    moe_weight_input: bool = False
    moe_bias_update: bool = False
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    nope_every: int = 0
    attention_chunk_size: int | None = None
    sliding_window: int | None = None
    qk_norm: bool = False
    attn_temperature_tuning: bool = False
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1

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
        need(self.moe_n_expert >= 0, f"moe_n_expert must be >= 0 (0 = dense), got {self.moe_n_expert}")
        if self.moe_n_expert > 0:
            need(
                1 <= self.moe_top_k <= self.moe_n_expert,
                f"moe_top_k={self.moe_top_k} must be between 1 and moe_n_expert={self.moe_n_expert}",
            )
            need(self.moe_every >= 1, f"moe_every must be >= 1, got {self.moe_every}")
            need(
                self.moe_score in ("softmax", "sigmoid"),
                f"moe_score must be 'softmax' or 'sigmoid', got {self.moe_score!r}",
            )
            need(
                not (self.moe_renormalize and self.moe_score != "softmax"),
                "moe_renormalize applies to softmax scoring only",
            )
            need(self.mlp == "swiglu", f"MoE experts are SwiGLU; mlp={self.mlp!r} is not supported with MoE")
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
        need(
            self.nope_every >= 0, f"nope_every must be >= 0 (0 = RoPE on every layer), got {self.nope_every}"
        )
        need(
            self.nope_every == 0 or self.pos == "rope",
            f"nope_every={self.nope_every} needs pos='rope' (NoPE layers are the RoPE model's global layers)",
        )
        for key in ("attention_chunk_size", "sliding_window"):
            value = getattr(self, key)
            need(value is None or value > 0, f"{key} must be positive or None, got {value!r}")
        need(self.attn_floor_scale > 0, f"attn_floor_scale must be positive, got {self.attn_floor_scale}")

    # ---------------------------------------------------------------------------------------- layer kinds
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` holds a Mixture-of-Experts (else a dense MLP)."""
        return self.moe_n_expert > 0 and (layer_idx + 1) % self.moe_every == 0

    def is_nope_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` is a global layer without RoPE (Llama 4 iRoPE)."""
        return self.nope_every > 0 and (layer_idx + 1) % self.nope_every == 0

    def is_local_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` restricts attention to a chunk or a sliding window."""
        restricted = self.attention_chunk_size is not None or self.sliding_window is not None
        return restricted and not self.is_nope_layer(layer_idx)

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


# What every Llama 4 preset shares: sigmoid top-1 routing that scales the expert's input, a shared expert,
# NoPE on every fourth layer with temperature tuning there, chunked attention on the RoPE layers.
_LLAMA4_FLAVOUR: dict[str, Any] = dict(
    moe_top_k=1,
    moe_score="sigmoid",
    moe_weight_input=True,
    moe_shared_expert=True,
    nope_every=4,
    attention_chunk_size=8192,
    attn_temperature_tuning=True,
    attn_floor_scale=8192.0,
    attn_scale=0.1,
)
# The published shapes shared by Scout and Maverick (their Hugging Face ``text_config``).
_LLAMA4_TEXT: dict[str, Any] = dict(
    vocab_size=202048,
    n_layer=48,
    n_embd=5120,
    n_head=40,
    n_kv_head=8,
    head_dim=128,
    intermediate_size=16384,
    moe_intermediate_size=8192,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
)

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
    # Llama 4 in miniature (about 1.6M parameters, 1.0M active per token, like "tiny"): 4 routed experts
    # (top-1, sigmoid) plus a shared one on every layer, RoPE layers with chunked attention and QK-norm, one
    # global NoPE layer with temperature tuning. Trains on CPU.
    "llama4-tiny": dict(
        _LLAMA4_FLAVOUR,
        vocab_size=512,
        block_size=256,
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_kv_head=2,
        intermediate_size=352,
        rope_theta=500000.0,
        moe_n_expert=4,
        moe_intermediate_size=176,
        nope_every=4,
        attention_chunk_size=64,
        qk_norm=True,
        attn_floor_scale=64.0,
    ),
    # Llama-4-Scout-17B-16E text model: 16 experts on every layer, 17B active / 108B total parameters
    # (the published 109B includes the vision encoder and projector, which this backbone does not build).
    "llama4-scout": dict(
        _LLAMA4_TEXT,
        **_LLAMA4_FLAVOUR,
        block_size=10485760,
        moe_n_expert=16,
        moe_every=1,
        qk_norm=True,
        rope_scaling_factor=16.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=1.0,
        rope_original_max_seq_len=8192,
    ),
    # Llama-4-Maverick-17B-128E text model: 128 experts on every second layer (dense SwiGLU between),
    # 17B active / 400B total parameters (vision encoder excluded), no QK-norm.
    "llama4-maverick": dict(
        _LLAMA4_TEXT,
        **_LLAMA4_FLAVOUR,
        block_size=1048576,
        moe_n_expert=128,
        moe_every=2,
        qk_norm=False,
    ),
}
