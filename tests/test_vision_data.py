"""Image data for the Llama 4 vision model: image tokens, the image processor, the image world, the
DataModule, and training / using a vision model through the stage and the CLI."""

from __future__ import annotations

import ast
import json
import math
import random
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from lit_llm.data import images as world
from lit_llm.data.vision import VisionDataModule, collate_images
from lit_llm.errors import DataError
from lit_llm.losses import IGNORE_INDEX
from lit_llm.tokenizer import IMAGE_TOKENS, Tokenizer

from .conftest import fit_in


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["What color is the circle? red. Where is it? top left."] * 20, "bpe", 300)


# ---------------------------------------------------------------------------------------------- tokens
def test_image_tokens_come_after_every_existing_id(tok):
    vtok = tok.with_image_tokens()
    old = tok.tok.get_vocab(with_added_tokens=True)
    new = vtok.tok.get_vocab(with_added_tokens=True)
    assert {t: new[t] for t in old} == old  # no id moved: a text checkpoint keeps its embeddings
    ids = vtok.image_token_ids()
    assert [ids[t] for t in IMAGE_TOKENS] == list(range(tok.vocab_size, tok.vocab_size + len(IMAGE_TOKENS)))
    assert vtok.vocab_size == tok.vocab_size + len(IMAGE_TOKENS)
    assert vtok.with_image_tokens() is vtok and tok.image_token_ids() is None
    text = "What color is the circle?"
    assert vtok.encode(text) == tok.encode(text)
    assert Tokenizer.from_str(vtok.to_str()).image_token_ids() == ids  # saved with the tokenizer


@pytest.mark.parametrize("tiles", [(1, 1), (1, 2), (2, 3), (3, 1)])
def test_placeholders_follow_the_llama4_processor(tok, tiles):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    vtok = tok.with_image_tokens()
    # the processor's own string builder (it uses no processor state) tokenized by our tokenizer
    reference = Llama4Processor._prompt_split_image(None, tiles, 4)
    assert vtok.image_placeholder(tiles, 4) == vtok.encode(reference)
    n_tiles = tiles[0] * tiles[1] + (tiles[0] * tiles[1] > 1)
    assert vtok.image_placeholder(tiles, 4).count(vtok.patch_id) == 4 * n_tiles


def test_render_chat_never_trains_on_image_tokens(tok):
    vtok = tok.with_image_tokens()
    image = vtok.image_placeholder((2, 2), 3)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}, {"type": "image"}]},
    ]
    ids, mask = vtok.render_chat(msgs, images=[image, image])
    image_ids = set(vtok.image_token_ids().values())
    assert sum(i in image_ids for i in ids) == 2 * len(image)
    assert not any(m for i, m in zip(ids, mask) if i in image_ids)  # even inside the assistant turn
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == vtok.encode("red") + [vtok.end_id]
    # a plain string still renders as before
    assert (
        vtok.render_chat([{"role": "user", "content": "hi"}])[0]
        == tok.render_chat([{"role": "user", "content": "hi"}])[0]
    )
    with pytest.raises(ValueError, match="1 image placeholders given for 2 image parts|only 1 image"):
        vtok.render_chat(msgs, images=[image])
    with pytest.raises(ValueError, match="no image tokens"):
        tok.image_placeholder((1, 1), 4)


# ------------------------------------------------------------------------------------ image processor
class Size(NamedTuple):  # stands in for transformers' SizeDict (hashable: the function is lru_cached)
    height: int
    width: int


def hf_functions() -> dict:
    """``transformers``' Llama 4 canvas functions, compiled from its source: the module imports torchvision
    (not installed here), but these four functions need only math and torch."""
    import importlib.util

    spec = importlib.util.find_spec("transformers.models.llama4")
    src = Path(spec.submodule_search_locations[0], "image_processing_llama4.py").read_text()
    wanted = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions", "get_best_fit"}
    tree = ast.parse(src)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted
    ns = {
        "math": math,
        "torch": torch,
        "defaultdict": defaultdict,
        "lru_cache": lru_cache,
        "SizeDict": object,
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), "image_processing_llama4.py", "exec"), ns)
    return ns


def hf_target(hf: dict, h: int, w: int, tile: int, max_tiles: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(canvas in pixels, resized size) as ``Llama4ImageProcessor._preprocess`` computes them."""
    size = Size(tile, tile)
    hf["find_supported_resolutions"].cache_clear()
    res = torch.tensor(hf["find_supported_resolutions"](max_tiles, size))
    canvas = [int(v) for v in hf["get_best_fit"]((h, w), res)]
    capped = (min(max(h, tile), canvas[0]), min(max(w, tile), canvas[1]))
    new = hf["get_max_res_without_distortion"]((h, w), capped)
    return tuple(canvas), (max(new[0], 1), max(new[1], 1))


def test_canvas_and_resize_match_transformers():
    hf = hf_functions()
    rng = random.Random(0)
    for _ in range(300):
        tile, max_tiles = rng.choice([16, 32, 48]), rng.randint(1, 16)
        h, w = rng.randint(1, 400), rng.randint(1, 400)
        proc = world.ImageProcessor(tile, max_tiles)
        canvas, new = hf_target(hf, h, w, tile, max_tiles)
        rows, cols = proc.best_canvas(h, w)
        assert (rows * tile, cols * tile) == canvas, (h, w, tile, max_tiles)
        tiles, grid = proc.tiles(Image.new("RGB", (w, h), (200, 10, 10)))
        assert grid == (rows, cols)
        assert tiles.shape == (rows * cols + (rows * cols > 1), 3, tile, tile)
        # the resized image fills exactly new[0] x new[1] of the canvas; the rest is black padding
        mosaic = tiles[: rows * cols].reshape(rows, cols, 3, tile, tile).permute(2, 0, 3, 1, 4)
        mosaic = mosaic.reshape(3, rows * tile, cols * tile)
        filled = mosaic[0] > 0
        assert (
            filled[: new[0], : new[1]].all() and not filled[new[0] :].any() and not filled[:, new[1] :].any()
        )


def test_tiles_by_hand():
    S = 8
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, size=(S, 2 * S - 3, 3), dtype=np.uint8)  # 8 x 13: canvas 1 x 2, padded
    tiles, grid = world.ImageProcessor(S, max_tiles=2).tiles(Image.fromarray(pixels))
    assert grid == (1, 2) and tiles.shape == (3, 3, S, S)
    assert torch.equal(tiles[0], torch.from_numpy(pixels[:, :S]).permute(2, 0, 1))
    assert torch.equal(tiles[1, :, :, : S - 3], torch.from_numpy(pixels[:, S:]).permute(2, 0, 1))
    assert (tiles[1, :, :, S - 3 :] == 0).all()  # black padding on the right
    glob = Image.fromarray(pixels).resize((S, S), Image.Resampling.BILINEAR)  # the global tile: squashed
    assert torch.equal(tiles[2], torch.from_numpy(np.array(glob)).permute(2, 0, 1))
    x = world.normalize(torch.tensor([0, 255, 51], dtype=torch.uint8))
    assert torch.allclose(x, torch.tensor([-1.0, 1.0, (51 / 255 - 0.5) / 0.5]))
    # one tile: an image that fits is not resized; a larger one is shrunk without distortion and padded
    same, g1 = world.ImageProcessor(S).tiles(Image.fromarray(pixels[:, :S]))
    assert g1 == (1, 1) and torch.equal(same[0], tiles[0])
    wide, _ = world.ImageProcessor(S).tiles(Image.new("RGB", (32, 16), (255, 255, 255)))
    assert (wide[0, :, :4] == 255).all() and (wide[0, :, 4:] == 0).all()  # 32x16 -> 8x4, 4 rows of padding


def test_load_image_errors_and_transparency(tmp_path):
    with pytest.raises(DataError, match="image not found: .*nope.png"):
        world.load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image .*junk.png"):
        world.load_image(tmp_path / "junk.png")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read image .*cut.png"):
        world.load_image(tmp_path / "cut.png")
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert world.load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # over white
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "x.jpg", quality=100)
    assert world.load_image(tmp_path / "x.jpg").size == (8, 8)


# ---------------------------------------------------------------------------------------- image world
def cell_colors(image: Image.Image, config: world.ShapesConfig) -> list[str | None]:
    """The colour name at the centre-bottom of each cell (``None``: background), read from the pixels."""
    names = {v: k for k, v in world.COLORS.items()}
    out = []
    for cell in range(config.grid**2):
        y, x = (cell // config.grid) * config.cell, (cell % config.grid) * config.cell
        out.append(names.get(image.getpixel((x + config.cell // 2, y + config.cell * 3 // 4))))
    return out


def cell_shapes(image: Image.Image, config: world.ShapesConfig) -> list[str | None]:
    """The shape in each cell read from the pixels: a filled top-left corner is a square, a filled left
    middle a circle, else a triangle (``None``: background)."""
    bg, m, out = image.getpixel((0, 0)), max(1, config.cell // 8), []
    for cell in range(config.grid**2):
        y, x = (cell // config.grid) * config.cell, (cell % config.grid) * config.cell
        if image.getpixel((x + config.cell // 2, y + config.cell * 3 // 4)) == bg:
            out.append(None)
        elif image.getpixel((x + m + 1, y + m + 1)) != bg:
            out.append("square")
        else:
            out.append("circle" if image.getpixel((x + m + 1, y + config.cell // 2)) != bg else "triangle")
    return out


def test_world_answers_are_true_to_the_pixels():
    config = world.ShapesConfig()
    names = world.position_names(config.grid)
    records = world.questions(400, "train", config)
    assert {r["qtype"] for r in records} == set(world.QUESTION_TYPES)
    for r in records:
        colors = cell_colors(r["image"], config)
        shapes = [s.split(":") for s in r["scene"].split(";")]
        assert [c for c in colors if c] == [c for _, c, _ in shapes]  # drawn where the scene says
        check_answer(r["question"], r["answer"], colors, shapes, names)


def check_answer(q: str, a: str, colors: list, shapes: list, names: list[str]) -> None:
    """Assert that ``a`` answers ``q`` on the board whose cell colours (from the pixels) and scene are given."""
    assert f" {a} " not in f" {q[:-1]} "  # the question never contains its answer
    if q.startswith("What color is the shape in the "):
        assert colors[names.index(q[len("What color is the shape in the ") : -1])] == a
    elif q.startswith("What color is the "):
        assert [col for _, col, s in shapes if s == q[len("What color is the ") : -1]] == [a]
    elif q == "How many shapes are there?":
        assert int(a) == sum(c is not None for c in colors)
    elif q.startswith("How many "):
        assert int(a) == colors.count(q.split()[2])
    elif q.startswith("Where is the "):
        color, shape = q[len("Where is the ") : -1].split()
        assert [int(c) for c, col, s in shapes if (col, s) == (color, shape)] == [names.index(a)]
    elif q.startswith("Is there a "):
        color, shape = q[len("Is there a ") : -1].split()
        assert a == ("yes" if any((col, s) == (color, shape) for _, col, s in shapes) else "no")
    else:
        raise AssertionError(f"unknown question {q!r}")


def test_follow_up_questions_ask_about_the_same_board():
    config = world.ShapesConfig(grid=2, cell=16, max_shapes=4)
    names = world.position_names(2)
    plain = world.questions(200, "train", config, images=False)
    records = world.questions(200, "train", config, follow_ups=2)
    # the first questions and their boards do not depend on follow_ups
    assert [(r["question"], r["scene"]) for r in records] == [(r["question"], r["scene"]) for r in plain]
    assert all(r["follow_ups"] == [] for r in plain)
    counts = [len(r["follow_ups"]) for r in records]
    assert set(counts) == {0, 1, 2}  # uniform in 0..2
    for r in records:
        colors = cell_colors(r["image"], config)
        shapes = [s.split(":") for s in r["scene"].split(";")]
        asked = [r["question"]] + [f["question"] for f in r["follow_ups"]]
        assert len(set(asked)) == len(asked)  # no question asked twice
        for f in r["follow_ups"]:
            check_answer(f["question"], f["answer"], colors, shapes, names)


def test_captions_name_every_cell_in_reading_order():
    config = world.ShapesConfig(grid=2, cell=16, max_shapes=4, question_types=("describe",))
    names = world.position_names(2)
    for r in world.questions(50, "train", config):
        colors = cell_colors(r["image"], config)
        parts = r["answer"].split(". ")
        assert [p[: len(n)] for p, n in zip(parts, names)] == names and len(parts) == 4
        for part, name, color, shape in zip(parts, names, colors, cell_shapes(r["image"], config)):
            # "<place> empty" where the pixels show no shape, else "<place> <colour> <shape>"
            assert part[len(name) + 1 :] == (f"{color} {shape}" if color else "empty")


def test_world_is_seeded_streamed_and_split_by_scene():
    a = world.questions(50, "train")
    assert [r["scene"] for r in a[:20]] == [r["scene"] for r in world.questions(20, "train")]
    assert [r["question"] for r in a] == [r["question"] for r in world.questions(50, "train")]
    assert [r["scene"] for r in a] != [
        r["scene"] for r in world.questions(50, "train", world.ShapesConfig(seed=1))
    ]
    scenes = {s: {r["scene"] for r in world.questions(600, s, images=False)} for s in world.SPLITS}
    assert not scenes["train"] & scenes["val"] and not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]
    with pytest.raises(ValueError, match="split must be one of"):
        world.questions(1, "dev")
    with pytest.raises(ValueError, match="max_shapes"):
        world.ShapesConfig(grid=2, max_shapes=5)


def test_majority_baseline():
    recs = [{"qtype": "count", "answer": a} for a in "1 2 2 3".split()] + [
        {"qtype": "color", "answer": "red"}
    ]
    assert world.majority_answers(recs) == {"count": "2", "color": "red"}


# ------------------------------------------------------------------------------------------ DataModule
@pytest.fixture(scope="module")
def shapes_dm() -> VisionDataModule:
    dm = VisionDataModule(shapes_train=64, shapes_val=16, batch_size=8)
    dm.setup()
    return dm


def test_training_conversations_with_follow_ups():
    dm = VisionDataModule(image_size=32, seq_len=96, shapes_train=40, shapes_val=8, shapes_follow_ups=2)
    dm.setup()
    tok = dm.tokenizer
    turns = []
    for ex, item in zip(dm.train_examples, dm.shapes_items("train", 40)):
        answers = [m["content"] for m in item["messages"] if m["role"] == "assistant"]
        turns.append(len(answers))
        # every answer is trained on, in order; the image (4 <|patch|> tokens) comes once, in the first turn
        trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert trained == sum((tok.encode(a) + [tok.end_id] for a in answers), [])
        assert ex["input_ids"].count(tok.patch_id) == 4 and len(ex["tiles"]) == 1
        assert ex["input_ids"].index(tok.patch_id) < ex["prompt_len"]
    assert set(turns) == {1, 2, 3}
    # validation stays one question per board (the metrics)
    for ex in dm.val_examples:
        assert ex["labels"].count(tok.end_id) == 1


def test_batches_hold_tiles_in_row_order_and_labels_only_on_the_answer(shapes_dm):
    dm, tok = shapes_dm, shapes_dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    B = batch["input_ids"].shape[0]
    assert batch["images"].shape == (B, 3, 48, 48) and batch["images"].dtype == torch.float32
    assert (batch["input_ids"] == tok.patch_id).sum() == B * dm.tokens_per_tile == B * 9
    image_ids = torch.tensor(list(tok.image_token_ids().values()))
    for i, ex in enumerate(dm.val_examples[:B]):
        assert torch.equal(batch["images"][i], world.normalize(ex["tiles"][0]))
        labels = batch["labels"][i]
        trained = labels[labels != IGNORE_INDEX].tolist()
        assert trained == tok.encode(ex["answer"]) + [tok.end_id]
        # every label aligned with an image token (or any prompt token) is ignored
        assert (labels[torch.isin(batch["input_ids"][i], image_ids)] == IGNORE_INDEX).all()
        assert batch["answers"][i] == ex["answer"] and batch["qtypes"][i] == ex["qtype"]


def write_jsonl(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_jsonl_source_with_multi_tile_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (96, 48), (255, 0, 0)).save(tmp_path / "img/wide.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "img/small.jpg")
    recs = [
        {
            "image": "img/wide.png",
            "messages": [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "red"}],
        },
        {
            "image": ["img/small.jpg", "img/wide.png"],
            "type": "two",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
                },
                {"role": "assistant", "content": "blue, red"},
            ],
        },
    ] * 3
    dm = VisionDataModule(
        str(write_jsonl(tmp_path, recs)), max_tiles=4, seq_len=128, batch_size=6, val_fraction=0.3
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    # wide.png: 1 x 2 tiles + a global tile; small.jpg: one tile
    per_row = {3: 3 * 9, 4: 4 * 9}
    for row, n in zip(batch["input_ids"], batch["tiles_per_row"].tolist()):
        assert (row == tok.patch_id).sum() == per_row[n]
    assert batch["images"].shape[0] == batch["tiles_per_row"].sum()
    assert set(batch["qtypes"]) <= {"all", "two"}


def test_jsonl_bad_images_are_named_or_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    conv = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]
    recs = [{"image": "good.png", "messages": conv}] * 3 + [
        {"image": "missing.png", "messages": conv},
        {"image": "bad.png", "messages": conv},
    ]
    path = write_jsonl(tmp_path, recs)
    with pytest.raises(DataError, match=r"record 3: image not found: .*missing.png"):
        VisionDataModule(str(path)).setup()
    dm = VisionDataModule(str(path), skip_bad_records=True)
    dm.setup()
    assert dm.stats["bad_records_skipped"] == 2 and len(dm.train_examples) + len(dm.val_examples) == 3


def test_collate_concatenates_tiles_of_rows_in_order():
    ex = [
        {
            "input_ids": [1, 2],
            "labels": [2, 3],
            "tiles": torch.full((2, 3, 4, 4), 0, dtype=torch.uint8),
            "qtype": "a",
            "answer": "x",
        },
        {
            "input_ids": [1],
            "labels": [5],
            "tiles": torch.full((1, 3, 4, 4), 255, dtype=torch.uint8),
            "qtype": "b",
            "answer": "y",
        },
    ]
    b = collate_images(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2], [1, 0]] and b["labels"].tolist() == [[2, 3], [5, IGNORE_INDEX]]
    assert (
        b["images"][:2].eq(-1).all() and b["images"][2].eq(1).all() and b["tiles_per_row"].tolist() == [2, 1]
    )


# ------------------------------------------------------------------------------- stage, callback, CLI
def test_exact_rows_and_shuffled_images_by_hand():
    from lit_llm.stages.sft import exact_rows, shuffle_images

    logits = torch.zeros(3, 3, 5)
    logits[0, 1, 2] = logits[0, 2, 4] = 1  # row 0 predicts 2 then 4
    logits[1, 1, 2] = logits[1, 2, 3] = 1  # row 1 gets the second token wrong
    labels = torch.tensor([[-100, 2, 4], [-100, 2, 4], [-100, -100, -100]])
    assert exact_rows(logits, labels).tolist() == [1, 0, 0]  # a row without labels is not right
    images = torch.arange(6.0).view(6, 1, 1, 1)  # 3 rows x 2 tiles
    assert shuffle_images(images, torch.tensor([2, 2, 2])).flatten().tolist() == [4, 5, 0, 1, 2, 3]
    assert shuffle_images(images, torch.tensor([1, 2, 3])) is None
    assert shuffle_images(images[:2], torch.tensor([2])) is None


def tiny_vision_model(dm: VisionDataModule):
    from lit_llm.backbone import ModelConfig, Transformer

    cfg = ModelConfig.from_name(
        "llama4-vision-tiny", vocab_size=dm.vocab_size, n_layer=2, moe_n_expert=0, vision={"num_layers": 1}
    )
    cfg.vision.patch_token_id = dm.tokenizer.patch_id
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_exact_rows_agree_with_greedy_decoding_with_images(shapes_dm):
    """Teacher-forced "every answer token right" is greedy decoding writing exactly the answer and stopping."""
    from lit_llm.backbone.generate import generate
    from lit_llm.stages.sft import exact_rows

    dm, tok = shapes_dm, shapes_dm.tokenizer
    model = tiny_vision_model(dm)
    examples = dm.val_examples[:6]
    out = generate(
        model,
        [e["input_ids"][: e["prompt_len"]] for e in examples],
        4,
        stop_tokens=[tok.end_id],
        pad_id=tok.pad_id,
        images=world.normalize(torch.cat([e["tiles"] for e in examples])),
    )
    # make the model's own greedy replies the labels: every row is then exact; one changed token is not
    fake = []
    for e, reply in zip(examples, out.response_lists()):
        ids = e["input_ids"][: e["prompt_len"]] + reply
        fake.append({**e, "input_ids": ids[:-1], "labels": [IGNORE_INDEX] * (e["prompt_len"] - 1) + reply})
    b = collate_images(fake, tok.pad_id)
    with torch.no_grad():
        logits = model(b["input_ids"], images=b["images"])
    assert exact_rows(logits, b["labels"]).tolist() == [1] * 6
    b["labels"][0, e["prompt_len"] - 1] = (b["labels"][0, examples[0]["prompt_len"] - 1] + 1) % dm.vocab_size
    assert exact_rows(logits, b["labels"]).tolist() == [0] + [1] * 5


def test_sample_grid_draws_every_sample():
    from lit_llm.callbacks import sample_grid

    tiles = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    tiles[0, 0] = 255  # a red image
    samples = [
        {"tiles": tiles, "question": "What color?", "answer": "red", "reply": r}
        for r in ("red", "blue", "red")
    ]
    grid = sample_grid(samples, columns=2, scale=4)
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] == 2 * 204
    red = (grid[..., 0] == 255) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
    assert red.sum() == 3 * 32 * 32  # three enlarged red pictures
    text = grid[32:74].astype(int)  # under the first row of pictures: replies, green if right, red if not
    green = (text[..., 1] > text[..., 0] + 60) & (text[..., 1] > text[..., 2] + 60)
    red_text = (text[..., 0] > text[..., 1] + 60) & (text[..., 0] > text[..., 2] + 60)
    assert green[:, :204].any() and red_text[:, 204:].any() and not red_text[:, :204].any()


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """The shipped vision config, shrunk: a few steps on a tiny model, with its TensorBoard log."""
    work = tmp_path_factory.mktemp("vision")
    fit_in(
        work,
        "vision/shapes.yaml",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.precision",
        "32-true",
        "--data.shapes_train",
        "64",
        "--data.shapes_val",
        "16",
        "--data.batch_size",
        "8",
        "--model.model_overrides",
        "{n_layer: 1, moe_n_expert: 0, vision: {num_layers: 1, image_size: 32, projector_init_scale: 32.0}}",
    )
    return work


def test_fit_links_the_patch_id_and_logs_accuracy_and_pictures(vision_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_llm.checkpoint import load_backbone

    model, tok, meta = load_backbone(vision_run / "checkpoints/vision/last.ckpt")
    assert model.config.vision is not None and model.config.vision.patch_token_id == tok.patch_id
    assert meta["stage"] == "sft"
    (events,) = list((vision_run / "checkpoints/logs/vision").rglob("events.out*"))
    ea = EventAccumulator(str(events), size_guidance={"images": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for t in world.QUESTION_TYPES:
        assert {f"val/exact/{t}", f"val/exact_shuffled/{t}"} <= scalars
    assert "val/samples" in ea.Tags()["images"]


def test_generate_and_chat_answer_about_an_image(vision_run, tmp_path, capsys, monkeypatch):
    import io

    from lit_llm.cli import main

    ckpt = str(vision_run / "checkpoints/vision/last.ckpt")
    world.questions(1, "test")[0]["image"].save(tmp_path / "board.png")
    main(
        [
            "generate",
            "--ckpt",
            ckpt,
            "--chat",
            "--prompt",
            "What color is the circle?",
            "--image",
            str(tmp_path / "board.png"),
            "--max_new_tokens",
            "3",
        ]
    )
    assert capsys.readouterr().out.startswith("What color is the circle?\n")  # the reply on its own line
    monkeypatch.setattr("sys.stdin", io.StringIO("How many shapes are there?\nAnd now?\n"))
    # the default reply length fits the 80-token context of the image config (128 did not: refused)
    main(["chat", "--ckpt", ckpt, "--image", str(tmp_path / "board.png")])
    assert capsys.readouterr().out.count("assistant> ") == 2
    # a long conversation outgrows the context: the oldest exchanges after the first (it holds the image)
    # are forgotten, so every question is answered
    questions = [f"Is there a {c} square?" for c in ("red", "blue", "green", "yellow", "purple")] * 2
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(q + "\n" for q in questions)))
    main(["chat", "--ckpt", ckpt, "--image", str(tmp_path / "board.png"), "--max_new_tokens", "3"])
    out = capsys.readouterr().out
    assert out.count("assistant> ") == len(questions) and "no longer fits" not in out

    import lit_llm.backbone.generate as generation

    real_stream, prompts = generation.stream, []

    def recording_stream(model, ids, *args, **kwargs):
        prompts.append(list(ids))
        return real_stream(model, ids, *args, **kwargs)

    monkeypatch.setattr(generation, "stream", recording_stream)

    def prompts_of(questions: list[str], *flags: str) -> list[list[int]]:
        prompts.clear()
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(q + "\n" for q in questions)))
        main(
            ["chat", "--ckpt", ckpt, "--image", str(tmp_path / "board.png"), "--max_new_tokens", "3", *flags]
        )
        capsys.readouterr()
        return list(prompts)

    # --single_turn: each question is asked as if it were the first (the image, no earlier turns)
    q1, q2 = "How many shapes are there?", "Where is the red square?"
    alone = prompts_of([q2], "--single_turn")[0]
    assert prompts_of([q1, q2], "--single_turn")[1] == alone
    with_history = prompts_of([q1, q2])[1]
    assert len(with_history) > len(alone)  # without the flag the first exchange stays in the prompt
    with pytest.raises(DataError, match="image not found"):
        main(["generate", "--ckpt", ckpt, "--prompt", "x", "--image", str(tmp_path / "none.png")])


def test_text_only_checkpoint_refuses_an_image(sft_ckpt, tmp_path, capsys, monkeypatch):
    from lit_llm.cli import console_main

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    monkeypatch.setattr(
        "sys.argv",
        [
            "lit-llm",
            "generate",
            "--ckpt",
            str(sft_ckpt),
            "--chat",
            "--prompt",
            "hi",
            "--image",
            str(tmp_path / "x.png"),
        ],
    )
    with pytest.raises(SystemExit) as info:
        console_main()
    assert info.value.code == 2
    assert "is a text-only model (no vision tower): it cannot take --image" in capsys.readouterr().err


def test_stage_refuses_data_of_another_image_size(tmp_path):
    from lightning import Trainer

    from lit_llm.stages import SFTModule

    dm = VisionDataModule(image_size=32, shapes_train=16, shapes_val=8, batch_size=8)
    module = SFTModule(preset="llama4-vision-tiny", from_scratch=True, vocab_size=dm.vocab_size)
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(
        ValueError,
        match="32x32-pixel tiles of 4 <.patch.> tokens but the model's vision config wants 48x48 tiles of 9",
    ):
        trainer.fit(module, datamodule=dm)
    with pytest.raises(ValueError, match="from_scratch"):
        SFTModule(preset="llama4-vision-tiny")
