"""The decoder-only transformer: embeddings (+ image features fused at ``<|patch|>``) -> blocks -> norm -> lm_head.

Pure ``torch.nn``: no loss, no optimizer, no logging. Stages compute losses from the logits (or from the
final hidden states, for reward and value heads).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lit_llm.backbone.attention import Attention
from lit_llm.backbone.cache import KVCache, StaticKVCache
from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.masks import causal_mask, local_mask
from lit_llm.backbone.mlp import GeluMLP, SwiGLU
from lit_llm.backbone.moe import Experts, MoE
from lit_llm.backbone.norm import build_norm
from lit_llm.backbone.rope import inv_frequencies, rope_cos_sin
from lit_llm.backbone.vision import VisionTower


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``mlp`` is a dense MLP or, on the layers ``config.is_moe_layer`` picks, a Mixture-of-Experts.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = build_norm(config.norm, config.n_embd, config.norm_eps, config.bias)
        self.attn = Attention(config, layer_idx)
        self.post_attention_norm = build_norm(config.norm, config.n_embd, config.norm_eps, config.bias)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        elif config.mlp == "swiglu":
            self.mlp = SwiGLU(config.n_embd, config.intermediate_size, config.bias)
        else:
            self.mlp = GeluMLP(config.n_embd, config.intermediate_size, config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.input_norm(x), rope, attn_mask, cache, positions))
        return x + self.drop(self.mlp(self.post_attention_norm(x)))


class Transformer(nn.Module):
    """A Llama-style (or, by config, GPT-2-style) causal language model.

    Args:
        config: The model's shape and flavour.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embed = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.has_local_layers = any(config.is_local_layer(i) for i in range(config.n_layer))
        self.norm = build_norm(config.norm, config.n_embd, config.norm_eps, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Llama 4 early fusion: the vision tower's features replace the embeddings of <|patch|> tokens
        self.vision = VisionTower(config.vision, config.n_embd) if config.vision is not None else None
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer(
            "inv_freq",
            inv_frequencies(
                config.head_dim,
                config.rope_theta,
                config.rope_scaling_factor,
                config.rope_low_freq_factor,
                config.rope_high_freq_factor,
                config.rope_original_max_seq_len,
            ),
            persistent=False,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases; residual output projections scaled by 1/sqrt(2 L)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if name.startswith("vision."):
                continue  # the tower initialises itself (below)
            if isinstance(module, nn.Linear):
                scale = (
                    1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1
                )
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                module.reset_parameters(std, std / math.sqrt(2 * self.config.n_layer))
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        if self.vision is not None:
            self.vision.reset_parameters(std)
        self._reset_rope()

    def _reset_rope(self) -> None:
        """Recompute the RoPE frequencies in float32 (after building on the meta device or a dtype cast)."""
        c = self.config
        self.inv_freq = inv_frequencies(
            c.head_dim,
            c.rope_theta,
            c.rope_scaling_factor,
            c.rope_low_freq_factor,
            c.rope_high_freq_factor,
            c.rope_original_max_seq_len,
        ).to(self.inv_freq.device)

    def _apply(self, fn, recurse: bool = True):
        # .to(bfloat16) / .half() / bf16-true would round the frequencies too (angle errors that grow with
        # position): keep them float32 whatever the weights' dtype.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self._reset_rope()
        return self

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        static: bool = False,
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` positions (fixed-shape if ``static``)."""
        p = self.embed_tokens.weight
        c = self.config
        cls = StaticKVCache if static else KVCache
        return cls(
            c.n_layer, batch_size, c.n_kv_head, max_len, c.head_dim, dtype or p.dtype, device or p.device
        )

    def hidden(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``(B, T, C)`` for token ids ``idx`` ``(B, T)``.

        Args:
            idx: Token ids ``(B, T)``.
            positions: Position of every token ``(B, T)`` (RoPE angle or learned-embedding row). Defaults to
                ``cache.length + arange(T)``. Left-padded batches and packed sequences pass their own.
            attn_mask: Boolean ``(B, 1, T, S)``, True where a query may attend a key; ``S`` counts the cached
                keys plus the new ones. Defaults to causal attention. Local layers (chunked / sliding-window
                attention) further restrict it by comparing ``positions`` of queries and keys.
            cache: KV cache to read and extend (its length advances by ``T``).
            images: Image tiles ``(n_tiles, C, S, S)``, float, normalised (mean and std 0.5), for a model
                with a vision tower. Their features (``config.vision.tokens_per_tile`` per tile) replace the
                embeddings at the ``<|patch|>`` positions of ``idx`` in order: row 0 first, left to right
                (the tiles of all rows, concatenated in that order).

        Raises:
            ValueError: ``images`` given to a text-only model, images of the wrong shape, or a count of
                ``<|patch|>`` tokens that differs from the count of image features (both named).
        """
        return self._hidden(idx, positions, attn_mask, cache, images)

    def _hidden(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
        images: torch.Tensor | None,
    ) -> torch.Tensor:
        # the body of both entry points, ``hidden`` and ``forward``: neither calls the other, so a wrapper that
        # hooks each entry point (FSDP2 gathering the root's weights around a call) sees exactly one call
        B, T = idx.shape
        if cache is not None and cache.static and (positions is None or attn_mask is None):
            raise ValueError(
                "a StaticKVCache needs explicit positions and an attention mask over all its slots "
                "(see lit_llm.backbone.generate, which builds both)"
            )
        start = cache.length if cache is not None and not cache.static else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if attn_mask is None and cache is not None and (start > 0 or T > 1):
            attn_mask = causal_mask(T, start, device=idx.device)  # query start+i sees keys 0..start+i
        if self.pos_embed is not None and int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} exceeds block_size={self.config.block_size}")
        x = self.embed_tokens(idx)  # (B, T, C)
        if images is not None:
            x = self._fuse_images(idx, x, images)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            rope = rope_cos_sin(positions, self.inv_freq)  # each (B, T, hd)
        local_mask = self._local_mask(positions, attn_mask, cache) if self.has_local_layers else None
        x = self.drop(x)
        for block in self.layers:
            mask = local_mask if block.attn.is_local else attn_mask
            x = block(x, rope, mask, cache, positions)
        if cache is not None and not cache.static:
            cache.advance(T)
        return self.norm(x)

    def _fuse_images(self, idx: torch.Tensor, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``x`` with the vision tower's features written over the ``<|patch|>`` embeddings, in order."""
        if self.vision is None:
            raise ValueError(
                "this model is text-only (config.vision is None): it cannot take images; use a model built "
                "with a vision config (e.g. the llama4-vision-tiny preset)"
            )
        patch_id = self.config.vision.patch_token_id
        if patch_id < 0:
            raise ValueError(
                "config.vision.patch_token_id is not set (-1): link it from the tokenizer's <|patch|> id"
            )
        self.vision.check_images(images)
        is_patch = idx == patch_id
        n_tokens, per_tile = int(is_patch.sum()), self.config.vision.tokens_per_tile
        if n_tokens != images.shape[0] * per_tile:  # checked before the tower runs
            raise ValueError(
                f"the tokens hold {n_tokens} <|patch|> placeholders but the images give "
                f"{images.shape[0] * per_tile} features ({images.shape[0]} tiles x {per_tile} per tile); "
                "each tile needs exactly tokens_per_tile placeholders"
            )
        features = self.vision(images)  # (n_tiles * tokens_per_tile, C)
        # True positions are filled in row-major order (row 0 first, left to right), as Hugging Face does
        return x.masked_scatter(is_patch[..., None], features.to(x.dtype))

    def _local_mask(
        self, positions: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        """The mask of the local layers ``(B, 1, T, S)``: the global mask restricted to chunk / window."""
        key_pos = cache.update_positions(positions) if cache is not None else positions  # (B, S)
        if attn_mask is None:  # causal by index over the keys
            T, S = positions.shape[1], key_pos.shape[1]
            attn_mask = causal_mask(T, S - T, device=positions.device)
        return attn_mask & local_mask(
            positions, key_pos, self.config.attention_chunk_size, self.config.sliding_window
        )

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)``; arguments as in :meth:`hidden`."""
        return self.lm_head(self._hidden(idx, positions, attn_mask, cache, images))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def count_active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: all of them but the routed experts it is not sent to.

    Every MoE layer contributes its router, its shared expert and ``top_k`` of its ``E`` routed experts.
    Embedding and output head count in full (as in the published "active parameter" figures of Llama 4).
    The vision tower does not count: it runs once per image tile, not per token (the published 17B active
    parameters of Llama 4 exclude it too).
    """
    vision = getattr(model, "vision", None)
    inactive = count_parameters(vision) if isinstance(vision, nn.Module) else 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = (m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()) // m.n_expert
            inactive += (m.n_expert - m.top_k) * per_expert
    return count_parameters(model) - inactive
