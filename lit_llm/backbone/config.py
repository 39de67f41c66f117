"""The model configuration: one typed dataclass, derived values in ``__post_init__``, named presets.

Every knob of the backbone lives here as a plain value (ints, floats, strings, bools), so a config can be
written to YAML, stored inside a checkpoint and compared for equality. ``ModelConfig.from_name("tiny")``
gives a preset; keyword overrides replace any field::

    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=300)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints


@functools.cache
def _scalar_fields(cls: type) -> dict[str, type]:
    """``cls``'s fields typed int, float or bool (resolved once per class)."""
    return {k: v for k, v in get_type_hints(cls).items() if v in (int, float, bool)}


def coerce_scalars(obj: Any, owner: str) -> None:
    """Turn text values of ``obj``'s int / float / bool fields into those types, in place.

    A value given on the command line inside a free-form dict (``--model.model_overrides.n_head 2``) may
    arrive as the text ``"2"``; it is read as the field's type. Text that is not one raises a
    ``ValueError`` naming the field, instead of a ``TypeError`` from a later comparison.
    """
    for name, hint in _scalar_fields(type(obj)).items():
        value = getattr(obj, name, None)
        if not isinstance(value, str):
            continue
        text = value.strip().lower()
        try:
            if hint is bool:
                if text not in ("true", "false"):
                    raise ValueError(text)
                parsed: Any = text == "true"
            else:
                parsed = hint(float(text)) if hint is float else int(text)
        except ValueError:
            raise ValueError(f"{owner}: {name} must be {hint.__name__}, got {value!r}") from None
        setattr(obj, name, parsed)


@dataclass
class VisionConfig:
    """Shape of the Llama 4 vision tower (``lit_llm.backbone.vision``), nested in ``ModelConfig.vision``.

    The couplings Hugging Face's ``Llama4VisionConfig`` leaves unchecked (a mismatch there fails with a
    shape error deep in a forward pass) are checked here: the adapter's input width is the encoder's
    ``intermediate_size``, so that must equal ``hidden_size / pixel_shuffle_ratio ** 2``; the adapter's
    second layer is square, so ``projector_input_dim == projector_output_dim``; the pixel shuffle merges
    ``s x s`` blocks of patches (``s = 1 / pixel_shuffle_ratio``, an integer dividing the patches per side).

    Args:
        image_size: Side of one square tile, in pixels.
        patch_size: Side of one square patch, in pixels (divides ``image_size``).
        num_channels: Colour channels of the input (3 for RGB).
        hidden_size: Width of the vision encoder.
        intermediate_size: Hidden width of the encoder MLP, and the width of the pixel-shuffled features
            the adapter reads (must be ``hidden_size / pixel_shuffle_ratio ** 2``).
        num_layers: Encoder layers.
        num_heads: Attention heads (``hidden_size / num_heads`` must be a multiple of 4: the 2-D RoPE
            splits each head's pairs between the x and y axes).
        pixel_shuffle_ratio: ``1 / s`` for the ``s x s`` blocks of patches merged into one token.
        projector_input_dim: Output width of the adapter's first layer.
        projector_output_dim: Output width of the adapter (the projector's input).
        rope_theta: Base of the vision RoPE frequencies.
        norm_eps: Epsilon of the LayerNorms (Hugging Face's tower always uses 1e-5).
        patch_token_id: Id of ``<|patch|>`` in the tokenizer: image features replace the embeddings of these
            tokens. ``-1`` until linked from the tokenizer.
        projector_init_scale: Multiplies the standard deviation of the projector's initial weights (an
            initialisation setting only: no forward pass and no Hugging Face export depends on it). With the
            default 1 a fresh tower's features are several times smaller than the token embeddings they
            replace, so a model trained from scratch learns to use the image late; a larger value starts
            them nearer the embeddings' scale.
    """

    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 128
    projector_output_dim: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    patch_token_id: int = -1
    projector_init_scale: float = 1.0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"VisionConfig: {msg}")

        coerce_scalars(self, "VisionConfig")

        for key in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "projector_input_dim",
            "projector_output_dim",
        ):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, f"{key} must be a positive integer, got {value!r}")
        need(
            self.image_size % self.patch_size == 0,
            f"patch_size={self.patch_size} must divide image_size={self.image_size}",
        )
        need(
            self.hidden_size % self.num_heads == 0,
            f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}",
        )
        need(
            self.head_dim % 4 == 0,
            f"the head width hidden_size / num_heads = {self.head_dim} must be a multiple of 4 (the 2-D "
            "RoPE rotates pairs, half of them along x and half along y)",
        )
        r = self.pixel_shuffle_ratio
        s = round(1 / r) if r > 0 else 0
        need(
            0 < r <= 1 and s >= 1 and abs(s * r - 1) < 1e-9,
            f"pixel_shuffle_ratio must be 1/s for a whole number s >= 1 (0.5 merges 2x2 patches), got {r}",
        )
        side = self.image_size // self.patch_size
        need(
            side % s == 0,
            f"pixel_shuffle_ratio={r} merges {s}x{s} blocks of patches, but a tile has {side}x{side} "
            f"patches (image_size {self.image_size} / patch_size {self.patch_size}); choose sizes that "
            f"make {side} a multiple of {s}",
        )
        need(
            self.intermediate_size == self.shuffled_dim,
            f"intermediate_size={self.intermediate_size} must equal hidden_size / pixel_shuffle_ratio**2 = "
            f"{self.hidden_size} * {s * s} = {self.shuffled_dim}: the adapter reads the pixel-shuffled "
            "features with that width (Llama 4 ties the two)",
        )
        need(
            self.projector_input_dim == self.projector_output_dim,
            f"projector_input_dim={self.projector_input_dim} must equal projector_output_dim="
            f"{self.projector_output_dim}: Llama 4's adapter has a square second layer",
        )
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(
            self.projector_init_scale > 0,
            f"projector_init_scale must be positive, got {self.projector_init_scale}",
        )
        need(
            self.patch_token_id >= -1,
            f"patch_token_id must be a token id or -1 (not linked yet), got {self.patch_token_id}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Patches per tile (the class token not counted)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def shuffled_dim(self) -> int:
        """Width of one token after the pixel shuffle: ``hidden_size / pixel_shuffle_ratio ** 2``."""
        return self.hidden_size * round(1 / self.pixel_shuffle_ratio) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """``<|patch|>`` placeholders (= image features) per tile: ``num_patches * pixel_shuffle_ratio ** 2``."""
        return self.num_patches // round(1 / self.pixel_shuffle_ratio) ** 2


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
        vision: The vision tower (Llama 4 early fusion: image features replace the embeddings of the
            ``<|patch|>`` tokens); ``None`` for a text-only model. A dict is turned into a
            :class:`VisionConfig`.
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
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig({self.name!r}): {msg}")

        coerce_scalars(self, f"ModelConfig({self.name!r})")

        if isinstance(self.vision, dict):  # from YAML, a checkpoint's to_dict(), or model_overrides
            known = {f.name for f in dataclasses.fields(VisionConfig)}
            unknown = sorted(set(self.vision) - known)
            need(not unknown, f"unknown vision fields {unknown}; known fields: {sorted(known)}")
            self.vision = VisionConfig(**self.vision)
        need(
            self.vision is None or isinstance(self.vision, VisionConfig),
            f"vision must be a VisionConfig, a dict of its fields or None, got {type(self.vision).__name__}",
        )

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
        if self.vision is not None:
            need(
                self.vision.patch_token_id < self.vocab_size,
                f"vision.patch_token_id={self.vision.patch_token_id} is outside the vocabulary "
                f"(vocab_size={self.vocab_size}); link it from the tokenizer's <|patch|> id",
            )

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
        preset_vision, vision = PRESETS[name].get("vision"), overrides.get("vision")
        if isinstance(preset_vision, dict) and isinstance(vision, dict):
            values["vision"] = {**preset_vision, **vision}  # override single vision fields
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

_LLAMA4_TINY: dict[str, Any] = dict(
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
    "llama4-tiny": dict(_LLAMA4_TINY),
    # Llama 4 in miniature with eyes: the text part of "llama4-tiny" (chunks of 128 positions, so that an
    # image and its question share a chunk) and a 2-layer vision tower on 48-pixel tiles of 8-pixel patches
    # (36 patches, 9 <|patch|> tokens per tile after the 2x2 pixel shuffle). Trains on CPU.
    "llama4-vision-tiny": dict(
        _LLAMA4_TINY,
        attention_chunk_size=128,
        vision=dict(
            image_size=48,
            patch_size=8,
            hidden_size=64,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            projector_input_dim=128,
            projector_output_dim=128,
        ),
    ),
    # Llama-4-Scout-17B-16E: 16 experts on every layer, 17B active / 109B total parameters, of which the
    # vision tower + projector (the published vision_config: 34 layers of width 1408 on 336-pixel tiles of
    # 14-pixel patches, 144 <|patch|> tokens per tile; <|patch|> is id 200092) hold 0.87B.
    "llama4-scout": dict(
        _LLAMA4_TEXT,
        **_LLAMA4_FLAVOUR,
        vision=dict(
            image_size=336,
            patch_size=14,
            hidden_size=1408,
            intermediate_size=5632,
            num_layers=34,
            num_heads=16,
            pixel_shuffle_ratio=0.5,
            projector_input_dim=4096,
            projector_output_dim=4096,
            rope_theta=10000.0,
            patch_token_id=200092,
        ),
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
