"""The Llama 4 vision tower and early fusion: parity with Hugging Face ``Llama4ForConditionalGeneration``
(logits and vision-weight gradients), the pieces by hand, the config's checks, fusion errors, generation
with images, conversion and export.

The Hugging Face reference is built from the model's own submodules: in transformers 5.24
``Llama4ForConditionalGeneration.forward`` raises ``AttributeError`` (``image_outputs``) on every call, so
``hf_reference_logits`` runs ``get_image_features`` -> ``multi_modal_projector`` -> ``masked_scatter`` into
the token embeddings -> ``language_model``, which is what that ``forward`` does before it fails.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lit_llm.backbone import ModelConfig, Transformer, VisionConfig, count_active_parameters
from lit_llm.backbone import vision as vision_mod
from lit_llm.backbone.generate import generate, stream
from lit_llm.backbone.vision import VisionTower, pixel_shuffle, vision_rope_angles
from lit_llm.formats.hf import export_hf, from_hf, import_hf, state_dict_to_hf, to_hf

transformers = pytest.importorskip("transformers")

PATCH = 95  # <|patch|> in the test vocabulary
TEXT = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=16,
    intermediate_size_mlp=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    num_local_experts=2,
    interleave_moe_layer_step=2,
    no_rope_layer_interval=2,
    attention_chunk_size=16,
    use_qk_norm=True,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)
# 32-pixel tiles of 8-pixel patches: a 4 x 4 grid, 2 x 2 = 4 <|patch|> tokens per tile after the shuffle.
# Two heads of width 16: 4 RoPE pairs along x and 4 along y per head.
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=48,
    projector_output_dim=48,
    vision_output_dim=48,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
)
TPT = 4  # tokens per tile


def make_hf(tie: bool = False, seed: int = 0):
    """A tiny random ``Llama4ForConditionalGeneration`` with loud weights: every LayerNorm weight and bias,
    the class token and the position table far from their defaults."""
    torch.manual_seed(seed)
    config = transformers.Llama4Config(
        text_config=dict(TEXT, tie_word_embeddings=tie),
        vision_config=VISION,
        image_token_index=PATCH,
        tie_word_embeddings=tie,
    )
    hf = transformers.Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return hf


def hf_reference_logits(hf, idx: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """What ``Llama4ForConditionalGeneration.forward`` computes (it raises in transformers 5.24)."""
    feats = hf.get_image_features(pixel_values=images, return_dict=True).last_hidden_state
    projected = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    embeds = hf.get_input_embeddings()(idx)
    embeds = embeds.masked_scatter((idx == PATCH)[..., None], projected)
    return hf.language_model(inputs_embeds=embeds).logits


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, five tiles: row 0 holds one image of two tiles (with a separator token between them),
    row 1 two images of one and two tiles; text around and between them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 90, (2, 40), generator=g)
    idx[0, 3 : 3 + TPT] = PATCH
    idx[0, 3 + TPT + 1 : 3 + 2 * TPT + 1] = PATCH
    idx[1, 2 : 2 + TPT] = PATCH
    idx[1, 20 : 20 + 2 * TPT] = PATCH
    images = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1  # normalised pixels
    return idx, images


def _loud_ours(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(
        "llama4-vision-tiny",
        vocab_size=97,
        n_layer=2,
        n_embd=32,
        n_head=4,
        nope_every=2,
        moe_every=2,
        moe_n_expert=2,
        moe_intermediate_size=16,
        intermediate_size=24,
        vision=dict(
            image_size=32,
            hidden_size=32,
            intermediate_size=128,
            projector_input_dim=48,
            projector_output_dim=48,
            num_heads=2,
            patch_token_id=PATCH,
        ),
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf_multi_tile_multi_image(tie):
    hf = make_hf(tie)
    ours = from_hf(hf).eval()
    assert ours.config.vision.patch_token_id == PATCH and ours.config.tie_embeddings == tie
    idx, images = batch()
    with torch.no_grad():
        want = hf_reference_logits(hf, idx, images)
        got = ours(idx, images=images)
    assert want.abs().max() > 1.0  # loud enough that a small slip shows
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vision_gradients_match_hf():
    hf = make_hf()
    ours = from_hf(hf).eval()
    idx, images = batch()
    w = torch.randn(2, 40, 97, generator=torch.Generator().manual_seed(3))
    (hf_reference_logits(hf, idx, images) * w).sum().backward()
    (ours(idx, images=images) * w).sum().backward()
    theirs = dict(hf.named_parameters())
    names = hf_vision_names(ours)
    assert len(names) == sum(1 for k in theirs if k.startswith(("vision_model.", "multi_modal_projector.")))
    for mine, their_name in names.items():
        g_ours = dict(ours.named_parameters())[mine].grad
        g_hf = theirs[their_name].grad
        scale = g_hf.abs().max()
        assert scale > 0, their_name
        torch.testing.assert_close(g_ours / scale, g_hf / scale, rtol=1e-5, atol=1e-5, msg=their_name)


def test_float64_tower_equals_hf_bit_for_bit():
    """In float64 the tower and projector agree with Hugging Face's exactly, features and every vision
    gradient: the same formulas, rounded at the same places (both rotate float32 pairs by complex64
    angles). The float32 differences of the whole model come from the text RoPE, which the two sides
    write differently (complex product against rotate-half)."""
    hf = make_hf().double()
    rotary = hf.vision_model.rotary_embedding  # .double() cast its complex buffer to real: rebuild it
    rotary.freqs_ci = rotary._compute_freqs_ci(rotary.config)
    torch.set_default_dtype(torch.float64)  # so that from_hf builds ours in float64 (conftest restores it)
    ours = from_hf(hf).eval()
    assert ours.embed_tokens.weight.dtype == torch.float64
    images = batch()[1].double()
    feats = hf.get_image_features(pixel_values=images, return_dict=True).last_hidden_state
    want = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    got = ours.vision(images)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (want * w).sum().backward()
    (got * w).sum().backward()
    theirs, mine = dict(hf.named_parameters()), dict(ours.named_parameters())
    for a, b in hf_vision_names(ours).items():
        torch.testing.assert_close(mine[a].grad, theirs[b].grad, rtol=1e-13, atol=1e-13, msg=b)


def hf_vision_names(model: Transformer) -> dict[str, str]:
    from lit_llm.formats.llama4 import _vision_names

    return _vision_names(model.config.vision)


_GELU = F.gelu

# Each Llama 4 feature removed from the tower, one at a time: the parity must break (> 1e-3).
MUTATIONS = {
    "no vision RoPE": lambda mp: mp.setattr(
        vision_mod,
        "vision_rope_angles",
        lambda c, device=None: torch.zeros(c.num_patches + 1, c.head_dim // 2),
    ),
    "0-based RoPE coordinates": lambda mp: mp.setattr(
        vision_mod,
        "vision_rope_angles",
        lambda c, device=None: _angles_with(c, lambda p, side: (p % side, p // side)),
    ),
    "x and y swapped": lambda mp: mp.setattr(
        vision_mod,
        "vision_rope_angles",
        lambda c, device=None: _angles_with(c, lambda p, side: (p // side + 1, p % side + 1)),
    ),
    "half-split RoPE": lambda mp: mp.setattr(vision_mod, "apply_pair_rope", _half_split_rope),
    "pixel_unshuffle channel order": lambda mp: mp.setattr(
        vision_mod, "pixel_shuffle", _channel_first_shuffle
    ),
    "no second GELU": lambda mp: mp.setattr(
        vision_mod.VisionAdapter, "forward", lambda self, x: self.fc2(F.gelu(self.fc1(x)))
    ),
    "tanh GELU": lambda mp: mp.setattr(
        vision_mod.F, "gelu", lambda x, approximate="none": _GELU(x, approximate="tanh")
    ),
}


def _angles_with(c: VisionConfig, coords) -> torch.Tensor:
    side = c.image_size // c.patch_size
    quarter = c.head_dim // 4
    freqs = 1.0 / c.rope_theta ** (torch.arange(quarter) * 4 / c.head_dim)
    p = torch.arange(side * side)
    x, y = coords(p, side)
    angles = torch.cat([x.float()[:, None] * freqs, y.float()[:, None] * freqs], -1)
    return torch.cat([angles, torch.zeros(1, angles.shape[1])])


def _half_split_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    cos, sin = rotation.real, rotation.imag
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def _channel_first_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    n, tokens, C = x.shape
    side = int(tokens**0.5)
    grid = x.transpose(1, 2).reshape(n, C, side, side)
    return F.pixel_unshuffle(grid, round(1 / ratio)).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_parity_breaks_without_each_feature(mutation, monkeypatch):
    hf = make_hf()
    ours = from_hf(hf).eval()
    idx, images = batch()
    with torch.no_grad():
        want = hf_reference_logits(hf, idx, images)
        MUTATIONS[mutation](monkeypatch)
        got = ours(idx, images=images)
    assert (got - want).abs().max() > 1e-3, mutation


# ------------------------------------------------------------------------------------ pieces by hand
def test_pixel_shuffle_order_by_index():
    side, C = 4, 3
    x = torch.arange(2 * side * side * C, dtype=torch.float32).reshape(2, side * side, C)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (2, 4, 4 * C)
    grid = x.reshape(2, side, side, C)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                want = torch.cat([grid[n, 2 * i + dy, 2 * j + dx] for dy in (0, 1) for dx in (0, 1)])
                torch.testing.assert_close(out[n, i * 2 + j], want)


def test_rope_angles_by_hand():
    c = VisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=64,
        num_heads=2,
        projector_input_dim=8,
        projector_output_dim=8,
        rope_theta=100.0,
    )
    a = vision_rope_angles(c)  # 2 x 2 patches + class token; head width 8: pairs (x, x, y, y)
    f = [1.0, 100.0 ** (-0.5)]  # theta ** (-4 j / 8)
    want = []
    for p in range(4):
        x, y = p % 2 + 1, p // 2 + 1
        want.append([x * f[0], x * f[1], y * f[0], y * f[1]])
    want.append([0.0] * 4)  # class token, last, not rotated
    torch.testing.assert_close(a, torch.tensor(want))


def test_pair_rotation_by_hand():
    from lit_llm.backbone.vision import apply_pair_rope

    x = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 4.0])[None, None, None]  # pairs (1, 0), (0, 2), (3, 4)
    angles = torch.tensor([[torch.pi / 2, torch.pi, 0.0]])
    out = apply_pair_rope(x, torch.polar(torch.ones_like(angles), angles))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 1.0, 0.0, -2.0, 3.0, 4.0]))


def test_patch_embedding_is_a_strided_convolution_and_class_token_is_last():
    torch.manual_seed(0)
    c = VisionConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        projector_input_dim=8,
        projector_output_dim=8,
    )
    tower = VisionTower(c, 8)
    img = torch.randn(2, 3, 16, 16)
    conv = F.conv2d(img, tower.patch_embed.weight.reshape(16, 3, 4, 4), stride=4).flatten(2).transpose(1, 2)
    patches = F.unfold(img, 4, stride=4).transpose(1, 2)
    torch.testing.assert_close(tower.patch_embed(patches), conv)
    # the encoder input: patches (+ pos rows 0..15), then the class token (+ pos row 16)
    seen = {}
    tower.pre_norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    tower.encode(img)
    torch.testing.assert_close(seen["x"][:, :16], conv + tower.pos_embed[:16])
    torch.testing.assert_close(seen["x"][:, 16], (tower.class_embedding + tower.pos_embed[16]).expand(2, -1))


def test_attention_within_a_tile_is_bidirectional_and_tiles_independent():
    model = _loud_ours()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        base = model.vision.encode(img)
        changed = img.clone()
        changed[0, :, 24:, 24:] += 1.0  # only the last patch of tile 0
        out = model.vision.encode(changed)
    assert (out[0, 0] - base[0, 0]).abs().max() > 1e-3  # the first patch sees the last one
    torch.testing.assert_close(out[1], base[1])  # the other tile is untouched


# ------------------------------------------------------------------------------------------- fusion
def test_features_fill_patch_positions_in_row_major_order():
    model = _loud_ours()
    idx, images = batch()
    seen = {}
    model.layers[0].register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        model(idx, images=images)
        feats = model.vision(images)
    x = seen["x"]
    torch.testing.assert_close(x[idx == PATCH], feats)  # boolean indexing walks row 0 first, left to right
    torch.testing.assert_close(x[idx != PATCH], model.embed_tokens(idx[idx != PATCH]))
    # tile 2 (the third of five) is row 1's first image
    torch.testing.assert_close(x[1, 2 : 2 + TPT], feats[2 * TPT : 3 * TPT])


def test_fusion_errors_name_the_problem():
    model = _loud_ours()
    idx, images = batch()
    with pytest.raises(ValueError, match=r"20 <\|patch\|> placeholders .* 16 features \(4 tiles x 4"):
        model(idx, images=images[:4])
    with pytest.raises(ValueError, match=r"\(n_tiles, 3, 32, 32\).*\(5, 3, 48, 48\)"):
        model(idx, images=torch.zeros(5, 3, 48, 48))
    text_only = Transformer(ModelConfig.from_name("tiny", vocab_size=97))
    with pytest.raises(ValueError, match="text-only"):
        text_only(idx, images=images)
    unlinked = Transformer(
        dataclasses.replace(model.config, vision=dataclasses.replace(model.config.vision, patch_token_id=-1))
    )
    with pytest.raises(ValueError, match="patch_token_id is not set"):
        unlinked(idx, images=images)


def test_generate_uses_images_in_prefill_with_and_without_cache():
    model = _loud_ours()
    idx, images = batch()
    rows = [idx[0, :30].tolist(), idx[1, :36].tolist()]  # different lengths: left padding shifts row 0
    cached = generate(model, rows, 6, images=images)
    full = generate(model, rows, 6, images=images, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    # each row alone, with its own tiles, gives the same tokens (row 0: tiles 0-1, row 1: tiles 2-4)
    alone0 = generate(model, rows[:1], 6, images=images[:2])
    alone1 = generate(model, rows[1:], 6, images=images[2:])
    assert alone0.response_lists()[0] == cached.response_lists()[0]
    assert alone1.response_lists()[0] == cached.response_lists()[1]
    assert list(stream(model, rows[1], 6, images=images[2:])) == cached.response_lists()[1]
    # by hand: the greedy argmax of a full forward pass with the images, one token at a time
    seq = torch.tensor([rows[1]])
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, images=images[2:])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert seq[0, 36:].tolist() == cached.response_lists()[1]


def test_bfloat16_and_int8_models_take_float32_images():
    import copy

    from lit_llm.backbone.quantize import quantize_int8

    model = _loud_ours()
    idx, images = batch()
    half = copy.deepcopy(model).to(torch.bfloat16)
    int8 = quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        want = model(idx, images=images)
        for variant in (half, int8):
            got = variant(idx, images=images)  # float32 tiles, cast to the model's dtype by the tower
            assert got.dtype == variant.embed_tokens.weight.dtype
            rel = (got.float() - want).norm() / want.norm()
            assert rel < 0.1, rel  # rounded weights: close to float32, not equal


def test_answer_learned_from_the_image_through_the_fusion():
    """A task only the image can answer (a bright or a dark tile -> token 10 or 11 after the placeholders):
    a few Adam steps learn it, every vision weight gets a gradient, and with the tiles swapped between
    the rows the answers swap too."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "llama4-vision-tiny",
        vocab_size=16,
        n_layer=1,
        n_embd=32,
        moe_n_expert=0,
        intermediate_size=64,
        vision=dict(image_size=16, hidden_size=32, intermediate_size=128, num_layers=1, patch_token_id=15),
    )
    model = Transformer(cfg)
    tpt = cfg.vision.tokens_per_tile
    idx = torch.tensor([[1] + [15] * tpt + [2]] * 8)  # text, one tile's placeholders, a question token
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        bright = torch.rand(8) < 0.5
        tiles = torch.where(bright[:, None, None, None], 0.5, -0.5) + 0.1 * torch.randn(8, 3, 16, 16)
        logits = model(idx, images=tiles)[:, -1]
        loss = F.cross_entropy(logits, 10 + bright.long())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
        opt.step()
    bright = torch.tensor([True, False] * 4)
    tiles = torch.where(bright[:, None, None, None], 0.5, -0.5) + 0.1 * torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        answer = model(idx, images=tiles)[:, -1].argmax(-1)
        swapped = model(idx, images=tiles[torch.arange(8) ^ 1])[:, -1].argmax(-1)
    assert answer.tolist() == (10 + bright.long()).tolist()
    assert swapped.tolist() == (11 - bright.long()).tolist()


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(intermediate_size=200), r"intermediate_size=200 must equal hidden_size / pixel_shuffle_ratio"),
        (dict(projector_output_dim=64), r"projector_input_dim=128 must equal projector_output_dim=64"),
        (dict(pixel_shuffle_ratio=0.3), r"pixel_shuffle_ratio must be 1/s"),
        (dict(image_size=40, intermediate_size=256), r"merges 2x2 blocks of patches, but a tile has 5x5"),
        (dict(image_size=36), r"patch_size=8 must divide image_size=36"),
        (dict(num_heads=32), r"head width hidden_size / num_heads = 2 must be a multiple of 4"),
        (dict(num_layers=0), r"num_layers must be a positive integer"),
        (dict(patch_token_id=-5), r"patch_token_id must be a token id or -1"),
        (dict(projector_init_scale=0.0), r"projector_init_scale must be positive"),
    ],
)
def test_vision_config_checks_couplings(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**fields)


def test_model_config_nests_vision():
    c = ModelConfig.from_name("llama4-vision-tiny", vision={"num_layers": 3})
    assert isinstance(c.vision, VisionConfig) and c.vision.num_layers == 3 and c.vision.image_size == 48
    assert c.vision.tokens_per_tile == (48 // 8) ** 2 // 4 == 9
    assert ModelConfig.from_dict(c.to_dict()) == c  # through a checkpoint's plain dict
    old = ModelConfig.from_name("tiny").to_dict()
    del old["vision"]  # a checkpoint written before the field existed
    assert ModelConfig.from_dict(old).vision is None
    with pytest.raises(ValueError, match=r"vision.patch_token_id=600 is outside the vocabulary"):
        ModelConfig.from_name("llama4-vision-tiny", vision={"patch_token_id": 600})
    with pytest.raises(ValueError, match=r"unknown vision fields \['layers'\]"):
        ModelConfig.from_name("llama4-vision-tiny", vision={"layers": 3})


def test_projector_init_scale_scales_the_initial_features():
    towers = []
    for scale in (1.0, 4.0):
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("llama4-vision-tiny", vision={"projector_init_scale": scale})
        towers.append(Transformer(cfg).vision)
    plain, scaled = (dict(t.named_parameters()) for t in towers)
    for name, p in plain.items():  # the same draws; only the projector is multiplied
        want = 4 * p if name == "projector.weight" else p
        torch.testing.assert_close(scaled[name], want, rtol=0, atol=0)
    img = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(towers[1](img), 4 * towers[0](img))


def test_scout_vision_parameters_equal_hf_on_meta():
    from transformers.models.llama4 import modeling_llama4 as M

    scout = ModelConfig.from_name("llama4-scout")
    v = scout.vision
    assert v.tokens_per_tile == 144 and v.patch_token_id == 200092
    hf_vision = transformers.Llama4VisionConfig(
        hidden_size=1408,
        image_size=336,
        intermediate_size=5632,
        num_attention_heads=16,
        num_hidden_layers=34,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=4096,
        projector_output_dim=4096,
        vision_output_dim=4096,
    )  # the published Llama-4-Scout-17B-16E vision_config
    hf_config = transformers.Llama4Config(
        vision_config=hf_vision.to_dict(), text_config={"hidden_size": 5120}
    )
    with torch.device("meta"):
        ours = Transformer(scout)
        theirs = sum(p.numel() for p in M.Llama4VisionModel(hf_config.vision_config).parameters())
        theirs += sum(p.numel() for p in M.Llama4MultiModalProjector(hf_config).parameters())
    assert sum(p.numel() for p in ours.vision.parameters()) == theirs == 871_932_416
    assert count_active_parameters(ours) < 17.3e9  # a text token does not run the tower


# ------------------------------------------------------------------------------- conversion, export
def test_to_hf_round_trip_and_from_pretrained(tmp_path):
    ours = _loud_ours()
    idx, images = batch()
    hf = to_hf(ours)
    assert type(hf).__name__ == "Llama4ForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(
            hf_reference_logits(hf, idx, images), ours(idx, images=images), rtol=1e-5, atol=1e-5
        )
    export_hf(ours, None, tmp_path)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "Llama4ForConditionalGeneration"
    back, _ = import_hf(tmp_path)
    with torch.no_grad():
        want = ours(idx, images=images)
        torch.testing.assert_close(hf_reference_logits(loaded, idx, images), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(idx, images=images), want)
    assert back.config.vision == ours.config.vision
    assert dataclasses.replace(back.config, name=ours.config.name) == ours.config


def test_unexpressible_vision_configs_are_refused():
    ours = _loud_ours()
    with pytest.raises(ValueError, match="vision tower"):
        state_dict_to_hf(ours.state_dict(), ours.config, "llama")
    eps = dataclasses.replace(ours.config, vision=dataclasses.replace(ours.config.vision, norm_eps=1e-6))
    with pytest.raises(ValueError, match="norm_eps=1e-06"):
        to_hf(Transformer(eps))
    from lit_llm.formats.hf import config_from_hf

    bad = transformers.Llama4Config(
        text_config=TEXT, vision_config=dict(VISION, vision_output_dim=40)
    ).to_dict()
    with pytest.raises(ValueError, match="vision_output_dim=40 differs from projector_output_dim=48"):
        config_from_hf(bad)
    bad = transformers.Llama4Config(
        text_config=TEXT, vision_config=dict(VISION, intermediate_size=100)
    ).to_dict()
    with pytest.raises(ValueError, match="intermediate_size=100 must equal"):
        config_from_hf(bad)


def test_export_with_tokenizer_writes_image_token_ids(tmp_path):
    import json

    from lit_llm.tokenizer import IMAGE_END, IMAGE_START, PATCH, Tokenizer

    tok = Tokenizer.train(["a red square left of a blue circle"] * 4, vocab_size=300).with_image_tokens()
    ids = tok.image_token_ids()
    cfg = ModelConfig.from_name(
        "llama4-vision-tiny", vocab_size=tok.vocab_size, vision={"patch_token_id": ids[PATCH]}
    )
    model = Transformer(cfg)
    export_hf(model, tok, tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    assert values["image_token_index"] == ids[PATCH]
    assert (values["boi_token_index"], values["eoi_token_index"]) == (ids[IMAGE_START], ids[IMAGE_END])
    back, back_tok = import_hf(tmp_path)
    assert back.config.vision.patch_token_id == back_tok.patch_id == ids[PATCH]
    wrong = Transformer(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_token_id=3)))
    with pytest.raises(ValueError, match=r"tokenizer's <\|patch\|> is id \d+ but the model's"):
        export_hf(wrong, tok, tmp_path / "wrong")
    assert not (tmp_path / "wrong" / "config.json").exists()


def test_to_hf_in_bfloat16_keeps_the_complex_vision_rope():
    hf = to_hf(_loud_ours().to(torch.bfloat16))
    freqs = hf.vision_model.rotary_embedding.freqs_ci
    assert freqs.is_complex()  # Module.to(bfloat16) alone would have cast it to real
    ref = hf.vision_model.rotary_embedding._compute_freqs_ci(hf.vision_model.config)
    torch.testing.assert_close(freqs, ref)
