"""Images for the Llama 4 vision model: reading files, the Llama 4 image processor, and the built-in image world.

**Reading** (:func:`load_image`): any format Pillow reads (PNG, JPEG, ...), converted to RGB (transparent
pixels composited over white, as Hugging Face's ``convert_to_rgb`` does). A missing file or one Pillow cannot
decode is a :class:`~lit_llm.errors.DataError` naming the path.

**Processing** (:class:`ImageProcessor`): the steps of Hugging Face's ``Llama4ImageProcessor``, written
here on Pillow and numpy (``transformers``' version needs torchvision):

1. choose a canvas of ``rows x cols`` tiles (at most ``max_tiles``) that the image fits best without
   distortion (:meth:`ImageProcessor.best_canvas`: the smallest upscale if any canvas allows one, else the
   least downscale; ties go to the smallest canvas);
2. resize the image, keeping its aspect ratio, to fit that canvas (never upscaling past one tile side
   unless ``resize_to_max_canvas``), bilinear;
3. pad it with black on the right and bottom to the canvas; cut the canvas into tiles, row by row;
4. with more than one tile, append a *global* tile: the whole image resized to one tile (distorted);
5. scale to ``[0, 1]`` and normalise with mean = std = 0.5 (so pixels lie in ``[-1, 1]``, padding at -1).

Steps 1-4 stay in ``uint8`` (:meth:`ImageProcessor.tiles`) so datasets keep images small;
:func:`normalize` does step 5 when a batch is built. (``transformers`` normalises in bfloat16; this
module in float32, so its values differ from theirs by bfloat16 rounding.)

**The image world** (:class:`ShapesWorld`, source name ``shapes``): seeded, offline scenes of coloured
shapes on a ``grid x grid`` board, drawn with Pillow, and questions whose answer needs the image:

* ``color``: "What color is the circle?" (asked when there is one circle) or "What color is the shape in
  the top left?" -> "red";
* ``count``: "How many shapes are there?" / "How many blue shapes are there?" -> "3";
* ``position``: "Where is the red square?" (asked when there is one) -> "bottom right";
* ``presence``: "Is there a green triangle?" -> "yes" / "no" (half and half);
* ``describe`` (only when asked for in ``question_types``): "Describe the board." -> "top left red circle.
  top right empty. ..." (every cell in reading order, empty ones too): a caption, a dense training signal
  for the vision tower.

A question never contains its answer, and the reply is the bare answer. As in tinyworld, each scene belongs
to exactly one split (``train`` 80%, ``val`` 10%, ``test`` 10%) by the CRC32 of its description, each
(split, stream) has its own seeded generator, and the first ``k`` items of a call equal a call with ``n = k``.
By default a cell is ``2 * patch_size`` pixels wide, so after the tower's pixel shuffle (ratio 0.5) each
``<|patch|>`` token stands for exactly one cell of the board.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from lit_llm.errors import DataError

SPLITS = ("train", "val", "test")
MEAN = STD = 0.5  # Llama 4's image_mean and image_std, every channel


# --------------------------------------------------------------------------------------------- reading
def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file Pillow can read.

    Raises:
        DataError: If the file does not exist or is not a readable image (truncated, corrupt, not an image).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a DataLoader
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err} (is it a complete PNG/JPEG file?)") from err


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited over white (as ``transformers``' ``convert_to_rgb``)."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "P") and (im.mode != "P" or "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# ------------------------------------------------------------------------------------------ processing
def normalize(tiles: torch.Tensor) -> torch.Tensor:
    """``uint8`` tiles ``(..., 3, S, S)`` -> float32 in ``[-1, 1]``: ``(x / 255 - mean) / std``."""
    return (tiles.float() / 255.0 - MEAN) / STD


def fit_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest ``(height, width)`` inside ``target`` with the aspect ratio of ``size`` (the limiting
    side equals the target's, the other is floored)."""
    (h, w), (th, tw) = size, target
    scale_h, scale_w = th / h, tw / w
    if scale_w < scale_h:
        return max(min(math.floor(h * scale_w), th), 1), max(tw, 1)
    return max(th, 1), max(min(math.floor(w * scale_h), tw), 1)


@dataclass(frozen=True)
class ImageProcessor:
    """Llama 4's image processing: resize without distortion, pad, cut into tiles, add a global tile.

    Args:
        tile_size: Side of a tile in pixels (the vision config's ``image_size``).
        max_tiles: Most tiles per image (Hugging Face's ``max_patches``; 16 for Llama 4, 1 here by default).
        resize_to_max_canvas: Upscale to the largest canvas that fits (else upscale as little as possible
            and never beyond one tile side, as in ``transformers``).
    """

    tile_size: int
    max_tiles: int = 1
    resize_to_max_canvas: bool = False

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.max_tiles < 1:
            raise ValueError(
                f"tile_size and max_tiles must be positive, got {self.tile_size}, {self.max_tiles}"
            )

    def canvases(self) -> list[tuple[int, int]]:
        """Every ``(rows, cols)`` of at most ``max_tiles`` tiles, in ``transformers``' order (which decides
        ties): by number of tiles from the most, grouped by aspect ratio in order of first appearance."""
        by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
        for n in range(self.max_tiles, 0, -1):
            for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
                by_ratio[rows / (n // rows)].append((rows, n // rows))
        return [c for group in by_ratio.values() for c in group]

    def best_canvas(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of the canvas the image fills best without distortion.

        The scale of a canvas is the smaller of its height and width ratios to the image's. If some canvas
        needs no downscale (scale >= 1), the smallest such scale wins (the largest with
        ``resize_to_max_canvas``); otherwise the largest scale (the least downscale). Among canvases with
        that scale, the one with the smallest area (least padding), the first in :meth:`canvases` order.
        """
        S = self.tile_size
        options = [(min(r * S / height, c * S / width), r * c, (r, c)) for r, c in self.canvases()]
        up = [s for s, _, _ in options if s >= 1]
        chosen = (max(up) if self.resize_to_max_canvas else min(up)) if up else max(s for s, _, _ in options)
        tied = [(area, i, rc) for i, (s, area, rc) in enumerate(options) if s == chosen]
        return min(tied)[2]

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """``uint8`` tiles ``(n, 3, S, S)`` of an RGB image and its ``(rows, cols)`` of tiles.

        ``n = rows * cols``, plus one global tile (last) when ``rows * cols > 1``. Tiles are in row-major
        order, as :meth:`~lit_llm.tokenizer.Tokenizer.image_placeholder` expects them.
        """
        image = to_rgb(image)
        S = self.tile_size
        w, h = image.size
        rows, cols = self.best_canvas(h, w)
        target = (rows * S, cols * S)
        if not self.resize_to_max_canvas:  # never upscale past one tile side
            target = (min(max(h, S), target[0]), min(max(w, S), target[1]))
        nh, nw = fit_without_distortion((h, w), target)
        resized = image if (nh, nw) == (h, w) else image.resize((nw, nh), Image.Resampling.BILINEAR)
        canvas = np.zeros((rows * S, cols * S, 3), dtype=np.uint8)  # black padding, right and bottom
        canvas[:nh, :nw] = np.asarray(resized)
        grid = canvas.reshape(rows, S, cols, S, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, S, S)
        out = torch.from_numpy(np.ascontiguousarray(grid))
        if rows * cols > 1:
            whole = image if image.size == (S, S) else image.resize((S, S), Image.Resampling.BILINEAR)
            out = torch.cat([out, torch.from_numpy(np.asarray(whole).transpose(2, 0, 1).copy())[None]])
        return out, (rows, cols)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised float tiles ``(n, 3, S, S)`` (values in ``[-1, 1]``) and ``(rows, cols)``."""
        tiles, grid = self.tiles(image)
        return normalize(tiles), grid


# ---------------------------------------------------------------------------------------- image world
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
QUESTION_TYPES: tuple[str, ...] = ("color", "count", "position", "presence")
# "describe" (a caption: every shape with its place) is an extra, dense training signal, not a test type
ALL_TYPES: tuple[str, ...] = (*QUESTION_TYPES, "describe")
BACKGROUND = (20, 20, 20)
_MAX_TRIES = 10_000


def position_names(grid: int) -> list[str]:
    """Names of the cells of a ``grid x grid`` board, row-major ("top left", ..., "center", ...)."""
    if grid == 1:
        return ["center"]
    rows = {2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}.get(grid)
    cols = {2: ["left", "right"], 3: ["left", "center", "right"]}.get(grid)
    if rows is None or cols is None:
        return [f"row {r + 1} column {c + 1}" for r in range(grid) for c in range(grid)]
    names = [f"{r} {c}" for r in rows for c in cols]
    return ["center" if n == "middle center" else n for n in names]


@dataclass(frozen=True)
class Shape:
    cell: int  # row-major index on the board
    shape: str
    color: str


@dataclass(frozen=True)
class ShapesConfig:
    """Knobs of the image world; generation is deterministic given the config.

    Attributes:
        seed: Base seed; each (stream, split) derives its own generator from it.
        grid: Board side in cells (names for 2 and 3; larger boards say "row r column c").
        cell: Cell side in pixels; the canvas is ``grid * cell`` square.
        min_shapes: Fewest shapes on a board.
        max_shapes: Most shapes on a board (at most ``grid * grid``).
        colors: How many of ``COLORS`` are used (the first ones).
        question_types: Which question types to draw from, with equal probability.
    """

    seed: int = 0
    grid: int = 3
    cell: int = 16
    min_shapes: int = 1
    max_shapes: int = 5
    colors: int = len(COLORS)
    question_types: tuple[str, ...] = QUESTION_TYPES

    def __post_init__(self) -> None:
        if self.grid < 1 or self.cell < 4:
            raise ValueError(
                f"grid must be >= 1 and cell >= 4 pixels, got grid={self.grid}, cell={self.cell}"
            )
        if not 1 <= self.min_shapes <= self.max_shapes <= self.grid**2:
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= grid**2 = {self.grid**2}, got "
                f"{self.min_shapes}, {self.max_shapes}"
            )
        if not 2 <= self.colors <= len(COLORS):
            raise ValueError(f"colors must be in 2..{len(COLORS)}, got {self.colors}")
        bad = [t for t in self.question_types if t not in ALL_TYPES]
        if bad or not self.question_types:
            raise ValueError(
                f"question_types must be a non-empty subset of {ALL_TYPES}, got {self.question_types}"
            )

    @property
    def canvas(self) -> int:
        return self.grid * self.cell


def draw(scene: tuple[Shape, ...], config: ShapesConfig) -> Image.Image:
    """The board as an RGB image: each shape filled in its cell, with a one-pixel-or-more margin."""
    c = config.cell
    im = Image.new("RGB", (config.canvas, config.canvas), BACKGROUND)
    d = ImageDraw.Draw(im)
    m = max(1, c // 8)
    for s in scene:
        y0, x0 = (s.cell // config.grid) * c, (s.cell % config.grid) * c
        box = (x0 + m, y0 + m, x0 + c - 1 - m, y0 + c - 1 - m)
        fill = COLORS[s.color]
        if s.shape == "square":
            d.rectangle(box, fill=fill)
        elif s.shape == "circle":
            d.ellipse(box, fill=fill)
        else:
            d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return im


def describe(scene: tuple[Shape, ...]) -> str:
    """A canonical text of a scene (its split is decided by this text's CRC32)."""
    return ";".join(f"{s.cell}:{s.color}:{s.shape}" for s in sorted(scene, key=lambda s: s.cell))


def scene_split(scene: tuple[Shape, ...]) -> str:
    """``train`` (80%), ``val`` or ``test`` (10% each), from the CRC32 of :func:`describe`."""
    h = zlib.crc32(describe(scene).encode()) % 10
    return "train" if h < 8 else ("val" if h == 8 else "test")


def _rng(stream: str, split: str, config: ShapesConfig) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(zlib.crc32(f"shapes|{config.seed}|{split}|{stream}".encode()))


def _random_scene(rng: random.Random, config: ShapesConfig) -> tuple[Shape, ...]:
    n = rng.randint(config.min_shapes, config.max_shapes)
    cells = sorted(rng.sample(range(config.grid**2), n))
    colors = list(COLORS)[: config.colors]
    return tuple(Shape(cell, rng.choice(SHAPES), rng.choice(colors)) for cell in cells)


def _question(
    scene: tuple[Shape, ...], qtype: str, rng: random.Random, config: ShapesConfig
) -> tuple[str, str] | None:
    """(question, answer) of type ``qtype`` about ``scene``, or ``None`` when this scene cannot pose one."""
    colors = list(COLORS)[: config.colors]
    names = position_names(config.grid)
    if qtype == "color":
        if rng.random() < 0.5:
            unique = [s for s in scene if sum(t.shape == s.shape for t in scene) == 1]
            if not unique:
                return None
            s = rng.choice(unique)
            return f"What color is the {s.shape}?", s.color
        s = rng.choice(scene)
        return f"What color is the shape in the {names[s.cell]}?", s.color
    if qtype == "describe":
        # every cell in reading order, empty ones too: each word of the caption is read from a fixed cell
        # (a fixed <|patch|> token), the easiest dense signal for the tower to learn colour and shape from
        at = {s.cell: f"{s.color} {s.shape}" for s in scene}
        return "Describe the board.", ". ".join(
            f"{names[c]} {at.get(c, 'empty')}" for c in range(config.grid**2)
        )
    if qtype == "count":
        if rng.random() < 0.5:
            return "How many shapes are there?", str(len(scene))
        color = rng.choice(colors)
        return f"How many {color} shapes are there?", str(sum(s.color == color for s in scene))
    if qtype == "position":
        unique = [s for s in scene if sum((t.shape, t.color) == (s.shape, s.color) for t in scene) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return f"Where is the {s.color} {s.shape}?", names[s.cell]
    present = {(s.color, s.shape) for s in scene}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        return f"Is there a {color} {shape}?", "yes"
    absent = [(c, s) for c in colors for s in SHAPES if (c, s) not in present]
    if not absent:
        return None
    color, shape = rng.choice(absent)
    return f"Is there a {color} {shape}?", "no"


def questions(
    n: int,
    split: str = "train",
    config: ShapesConfig = ShapesConfig(),
    images: bool = True,
    follow_ups: int = 0,
) -> list[dict]:
    """``n`` image questions on scenes of ``split``.

    Args:
        n: How many (one question per scene; the type drawn uniformly from ``config.question_types``).
        split: One of ``SPLITS``.
        config: The world's knobs.
        images: Draw the boards (``False``: the same records without ``image``, e.g. to train a tokenizer).
        follow_ups: Up to this many more questions about the same scene per record (how many: uniform in
            ``0..follow_ups``), for multi-turn conversations. They come from a generator of their own, so
            the first questions (and scenes) are the same whatever ``follow_ups`` is.

    Returns:
        ``[{"image": PIL image, "question": str, "answer": str, "qtype": str, "scene": str,
        "follow_ups": [{"question", "answer", "qtype"}, ...]}, ...]``.
    """
    return list(_stream(n, split, config, images, follow_ups))


def _follow_ups(
    scene: tuple[Shape, ...], first: str, k: int, rng: random.Random, config: ShapesConfig
) -> list[dict]:
    """Up to ``k`` more questions about ``scene`` (uniform count), none repeating an earlier one."""
    out: list[dict] = []
    asked = {first}
    for _ in range(rng.randint(0, k)):
        for _ in range(100):  # a type this scene cannot pose, or a repeat: draw again
            qtype = rng.choice(config.question_types)
            qa = _question(scene, qtype, rng, config)
            if qa is not None and qa[0] not in asked:
                asked.add(qa[0])
                out.append({"question": qa[0], "answer": qa[1], "qtype": qtype})
                break
    return out


def _stream(
    n: int, split: str, config: ShapesConfig, images: bool = True, follow_ups: int = 0
) -> Iterator[dict]:
    if n < 0 or follow_ups < 0:
        raise ValueError(f"n and follow_ups must be >= 0, got {n}, {follow_ups}")
    rng, follow_rng = _rng("qa", split, config), _rng("follow-ups", split, config)
    for _ in range(n):
        qtype = rng.choice(config.question_types)
        for _ in range(_MAX_TRIES):
            scene = _random_scene(rng, config)
            if scene_split(scene) != split:
                continue
            qa = _question(scene, qtype, rng, config)
            if qa is not None:
                break
        else:
            raise RuntimeError(f"could not draw a {split!r} scene for a {qtype!r} question")
        question, answer = qa
        record = {"question": question, "answer": answer, "qtype": qtype, "scene": describe(scene)}
        record["follow_ups"] = _follow_ups(scene, question, follow_ups, follow_rng, config)
        if images:
            record["image"] = draw(scene, config)
        yield record


def majority_answers(records: list[dict]) -> dict[str, str]:
    """The most common answer of each question type (ties: the first seen), the baseline a model that
    ignores the image can reach."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        counts[r["qtype"]][r["answer"]] += 1
    return {t: max(c, key=c.__getitem__) for t, c in counts.items()}
