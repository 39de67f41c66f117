"""Llama 4 vision tower: parity with Hugging Face ``Llama4ForConditionalGeneration`` and the tower's speed.

**Parity** (``--part parity``). For each shape below, a random model with loud weights (std 0.3, every
LayerNorm, class token and position table far from its default) is converted with ``lit_llm.formats.hf.to_hf``;
a batch of rows holding several images of several tiles each goes through ours (``model(idx, images=)``)
and through Hugging Face's own submodules (``get_image_features`` -> ``multi_modal_projector`` ->
``masked_scatter`` into the token embeddings -> ``language_model``; its ``forward`` raises
``AttributeError`` in transformers 5.24). Reported, float32, worst over ``--seeds`` seeds: the largest
absolute logit difference against the largest logit, and the largest difference of any vision / projector
weight's gradient relative to that gradient's largest entry; then the same for the tower + projector
alone (features, and gradients of a random linear function of them).

**Speed** (``--part speed``). The tower alone (tiles -> projected features), ours against Hugging Face's
``vision_model`` + ``multi_modal_projector`` with the same weights, forward and forward+backward, run
interleaved in one process (medians of ``--reps``), so a noisy machine slows both alike.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/vision_parity.py --threads 1
    python benchmarks/vision_parity.py --part parity --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.formats.hf import to_hf
from lit_llm.formats.llama4 import _vision_names

# name -> (text overrides, vision fields, tiles per image of each row)
SHAPES = {
    # the CPU preset's tower (48-pixel tiles, 9 tokens per tile) on a 2-layer text model
    "llama4-vision-tiny": (
        dict(n_layer=2, nope_every=2),
        dict(),
        [[1, 2], [3], [1, 1, 1]],
    ),
    # Scout's tile grammar (336-pixel tiles of 14-pixel patches, 144 tokens per tile; head width 88 as
    # Scout) at a small width and depth
    "scout-grid-small": (
        dict(n_layer=2, nope_every=2, n_embd=128, block_size=1024),
        dict(
            image_size=336,
            patch_size=14,
            hidden_size=176,
            num_heads=2,
            intermediate_size=704,
            num_layers=2,
            projector_input_dim=256,
            projector_output_dim=256,
        ),
        [[2], [1, 1]],
    ),
}


def build(name: str, seed: int) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    """A loud random model of shape ``name``, its token rows and their image tiles."""
    text, vision, layout = SHAPES[name]
    torch.manual_seed(seed)
    patch = 500
    cfg = ModelConfig.from_name(
        "llama4-vision-tiny", **text, vision={**vision, "patch_token_id": patch}, tie_embeddings=False
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    tpt = cfg.vision.tokens_per_tile
    rows = []
    for images in layout:
        row = torch.randint(0, 400, (5,)).tolist()
        for tiles in images:  # text, then each image's placeholders with a separator token per tile
            for _ in range(tiles):
                row += [patch] * tpt + [401]
            row += torch.randint(0, 400, (3,)).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    n_tiles = sum(sum(images) for images in layout)
    s = cfg.vision.image_size
    return model, idx, torch.rand(n_tiles, 3, s, s) * 2 - 1


def hf_logits(hf, idx: torch.Tensor, images: torch.Tensor, patch: int) -> torch.Tensor:
    feats = hf.get_image_features(pixel_values=images, return_dict=True).last_hidden_state
    projected = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    embeds = hf.get_input_embeddings()(idx).masked_scatter((idx == patch)[..., None], projected)
    return hf.language_model(inputs_embeds=embeds).logits


def _grad_diff(model: Transformer, hf) -> float:
    """Largest difference of a vision / projector gradient, relative to that gradient's largest entry."""
    mine, theirs = dict(model.named_parameters()), dict(hf.named_parameters())
    worst = 0.0
    for a, b in _vision_names(model.config.vision).items():
        g, ref = mine[a].grad, theirs[b].grad
        worst = max(worst, float((g - ref).abs().max() / ref.abs().max()))
    return worst


def parity(seeds: int) -> None:
    print(
        "| shape | tiles | rows | whole model: max abs logit diff | max abs logit | vision grad diff (rel) "
        "| tower alone: max abs feature diff | vision grad diff (rel) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in SHAPES:
        worst = dict(logit=0.0, scale=0.0, grad=0.0, feat=0.0, tower_grad=0.0)
        for seed in range(seeds):
            model, idx, images = build(name, seed)
            hf = to_hf(model)
            patch = model.config.vision.patch_token_id
            # the whole model: logits and the gradients they send back into the tower
            w = torch.randn(*idx.shape, model.config.vocab_size)
            ours, theirs = model(idx, images=images), hf_logits(hf, idx, images, patch)
            worst["logit"] = max(worst["logit"], float((ours - theirs).detach().abs().max()))
            worst["scale"] = max(worst["scale"], float(theirs.detach().abs().max()))
            (ours * w).sum().backward()
            (theirs * w).sum().backward()
            worst["grad"] = max(worst["grad"], _grad_diff(model, hf))
            # the tower and projector alone
            model.zero_grad()
            hf.zero_grad()
            feats = hf.vision_model(images).last_hidden_state
            theirs = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
            ours = model.vision(images)
            worst["feat"] = max(worst["feat"], float((ours - theirs).detach().abs().max()))
            w = torch.randn(ours.shape)
            (ours * w).sum().backward()
            (theirs * w).sum().backward()
            worst["tower_grad"] = max(worst["tower_grad"], _grad_diff(model, hf))
        print(
            f"| {name} | {images.shape[0]} | {idx.shape[0]} | {worst['logit']:.1e} | {worst['scale']:.1f} | "
            f"{worst['grad']:.1e} | {worst['feat']:.1e} | {worst['tower_grad']:.1e} |"
        )


def _rates(name: str, reps: int, tiles: int) -> dict[tuple[str, bool], float]:
    """Tiles/s of ours and Hugging Face's tower, forward and forward+backward, medians of ``reps``."""
    model, _, _ = build(name, 0)
    hf = to_hf(model)
    s = model.config.vision.image_size
    images = torch.rand(tiles, 3, s, s) * 2 - 1

    def ours() -> torch.Tensor:
        return model.vision(images)

    def theirs() -> torch.Tensor:
        feats = hf.vision_model(images).last_hidden_state
        return hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))

    torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-4)
    times: dict[tuple[str, bool], list[float]] = {}
    for rep in range(reps + 1):
        for label, fn in (("ours", ours), ("hf", theirs))[:: 1 if rep % 2 else -1]:
            for backward in (False, True):
                t0 = time.perf_counter()
                if backward:
                    fn().sum().backward()
                else:
                    with torch.no_grad():
                        fn()
                if rep:  # the first round warms up
                    times.setdefault((label, backward), []).append(time.perf_counter() - t0)
    return {k: tiles / statistics.median(v) for k, v in times.items()}


def speed(reps: int, tiles: int) -> None:
    print("| shape | tiles | ours fwd (tiles/s) | HF fwd | ratio | ours fwd+bwd | HF fwd+bwd | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in SHAPES:
        rate = _rates(name, reps, tiles)
        cells = []
        for backward in (False, True):
            o, h = rate[("ours", backward)], rate[("hf", backward)]
            cells += [f"{o:,.0f}", f"{h:,.0f}", f"{o / h:.2f}x"]
        print(f"| {name} | {tiles} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["parity", "speed", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=3, help="random models per shape (parity)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (speed)")
    parser.add_argument("--tiles", type=int, default=8, help="tiles per timed batch (speed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32")
    if args.part in ("parity", "both"):
        parity(args.seeds)
    if args.part in ("speed", "both"):
        speed(args.reps, args.tiles)


if __name__ == "__main__":
    main()
