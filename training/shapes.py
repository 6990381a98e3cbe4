"""The `shapes` dataset: one filled shape on a plain background, 64x64, seeded.

Five attributes (shape, color, background, size, position), the canonical caption
``a {size} {color} {shape} on a {background} background at the {position}``,
optional paraphrases for training, and a fixed held-out list of attribute
combinations that the training split never yields.

Everything is a pure function of its arguments: the same (seed, count, split)
gives the same images, byte for byte.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": (14, 18), "large": (28, 34)}  # bounding-box width range in pixels, inclusive
POSITIONS = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}
POSITION_JITTER = 4  # the bounding-box centre lies within this many pixels of its anchor
HELD_OUT_SEED = 20261122
HELD_OUT_FRACTION = 0.10
Split = Literal["train", "held_out", "all"]


@dataclass(frozen=True, order=True)
class Attributes:
    shape: str
    color: str
    background: str
    size: str
    position: str

    def caption(self) -> str:
        """The canonical caption (the template in the module docstring)."""
        return (
            f"a {self.size} {self.color} {self.shape} on a {self.background} background "
            f"at the {self.position}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    attributes: Attributes
    caption: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


def all_combinations() -> list[Attributes]:
    """All 3 x 8 x 7 x 2 x 5 = 1,680 attribute combinations, in a fixed order."""
    return [
        Attributes(shape, color, background, size, position)
        for shape, color, background, size, position in itertools.product(
            SHAPES, COLORS, COLORS, SIZES, POSITIONS
        )
        if background != color
    ]


def held_out_combinations() -> list[Attributes]:
    """The fixed held-out list: 10% of the combinations (168), drawn with seed HELD_OUT_SEED, sorted."""
    combos = all_combinations()
    count = round(HELD_OUT_FRACTION * len(combos))
    return sorted(random.Random(HELD_OUT_SEED).sample(combos, count))


_HELD_OUT = frozenset(held_out_combinations())


def is_held_out(attributes: Attributes) -> bool:
    return attributes in _HELD_OUT


def combinations(split: Split) -> list[Attributes]:
    """The combinations a split draws from."""
    if split == "all":
        return all_combinations()
    if split == "held_out":
        return held_out_combinations()
    if split == "train":
        return [c for c in all_combinations() if c not in _HELD_OUT]
    raise ValueError(f"Unknown split {split!r}; valid values: train, held_out, all.")


def _start_near(rng: np.random.Generator, anchor: int, extent: int) -> int:
    """A bounding-box start whose centre is within POSITION_JITTER of `anchor`, fully inside the image."""
    half = (extent - 1) / 2
    lowest = max(math.ceil(anchor - POSITION_JITTER - half), 0)
    highest = min(math.floor(anchor + POSITION_JITTER - half), IMAGE_SIZE - extent)
    return int(rng.integers(lowest, highest + 1))


def render(attributes: Attributes, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw one image (no anti-aliasing) and return it with the shape's bounding box."""
    low, high = SIZES[attributes.size]
    width = int(rng.integers(low, high + 1))
    height = round(width * 3**0.5 / 2) if attributes.shape == "triangle" else width
    anchor_x, anchor_y = POSITIONS[attributes.position]
    x0 = _start_near(rng, anchor_x, width)
    y0 = _start_near(rng, anchor_y, height)
    x1, y1 = x0 + width - 1, y0 + height - 1
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLORS[attributes.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[attributes.color]
    if attributes.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attributes.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image, (x0, y0, x1, y1)


def paraphrase(attributes: Attributes, rng: np.random.Generator) -> str:
    """A training caption: canonical half the time, otherwise reordered, 'in the', or with omissions.

    An omitted attribute means "any value", so the model learns each word on its own.
    """
    if rng.random() < 0.5:
        return attributes.caption()
    size = "" if rng.random() < 0.2 else f"{attributes.size} "
    noun = f"{size}{attributes.color} {attributes.shape}"
    clauses = []
    if rng.random() >= 0.2:
        clauses.append(f"on a {attributes.background} background")
    if rng.random() >= 0.2:
        preposition = "in the" if rng.random() < 0.5 else "at the"
        clauses.append(f"{preposition} {attributes.position}")
    if rng.random() < 0.5:
        clauses.reverse()
    return " ".join([f"a {noun}", *clauses])


def restrict(
    pool: list[Attributes], colors: Sequence[str] | None, backgrounds: Sequence[str] | None
) -> list[Attributes]:
    """The combinations whose shape colour is in `colors` and background in `backgrounds` (None: any)."""
    for name, values in (("colors", colors), ("backgrounds", backgrounds)):
        unknown = sorted(set(values or ()) - set(COLORS))
        if unknown:
            raise ValueError(f"Unknown {name} {unknown}; valid colours: {', '.join(COLORS)}.")
    kept = [a for a in pool if (not colors or a.color in colors) and (not backgrounds or a.background in backgrounds)]
    if not kept:
        raise ValueError(f"No combination has a shape colour in {colors} and a background in {backgrounds}.")
    return kept


def iter_samples(
    seed: int, split: Split = "train", paraphrases: bool = False,
    colors: Sequence[str] | None = None, backgrounds: Sequence[str] | None = None,
) -> Iterator[Sample]:
    """An endless, seeded stream of samples from a split (combinations drawn uniformly), optionally restricted."""
    pool = restrict(combinations(split), colors, backgrounds)
    rng = np.random.default_rng(seed)
    while True:
        attributes = pool[int(rng.integers(len(pool)))]
        image, bbox = render(attributes, rng)
        caption = paraphrase(attributes, rng) if paraphrases else attributes.caption()
        yield Sample(image=image, attributes=attributes, caption=caption, bbox=bbox)


def generate(
    seed: int, count: int, split: Split = "train", paraphrases: bool = False,
    colors: Sequence[str] | None = None, backgrounds: Sequence[str] | None = None,
) -> list[Sample]:
    """`count` samples from a split (see `iter_samples`); identical for identical arguments."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    return list(itertools.islice(iter_samples(seed, split, paraphrases, colors, backgrounds), count))


