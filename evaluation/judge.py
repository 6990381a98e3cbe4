"""The prompt-adherence judge: read a 64x64 `shapes` image's five attributes with classical vision.

Independent of any model being judged. The reading, for an RGB image:

1. every pixel is snapped to its nearest palette colour (Euclidean RGB), which absorbs the
   colour noise of generated images;
2. background = the most common palette colour on the one-pixel border;
3. foreground = pixels whose palette colour differs from the background; keep the largest
   8-connected component and fill its holes (noise specks elsewhere are ignored);
4. shape colour = the most common palette colour of the component's interior (eroded once,
   so edge pixels blended with the background do not vote);
5. size = bounding-box width: small (14-18 px in the spec) below 23 px, large (28-34 px) above;
   the strict reading (`Reading.strict_size`) takes the spec's ranges literally: small only at
   14-18 px, large only at 28-34 px, anything else unreadable;
6. position = the anchor nearest to the bounding-box centre, if it is within 10 px of it
   (the generator's jitter is 4 px; anchors are at least 22 px apart) else unreadable;
7. shape = the template (disc, square, upward triangle) drawn in the component's bounding box
   with the highest intersection-over-union with the component; below 0.6 it is unreadable.

An unreadable attribute is ``None`` and never equals an expected value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from training.shapes import COLORS, IMAGE_SIZE, POSITIONS, SIZES, Attributes

ATTRIBUTES = tuple(f.name for f in fields(Attributes))
PALETTE_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[name] for name in PALETTE_NAMES], dtype=np.float32)
SIZE_THRESHOLD = 23.0  # px; halfway between the small (<= 18) and large (>= 28) width ranges
MAX_POSITION_ERROR = 10.0  # px from the nearest anchor
MIN_TEMPLATE_IOU = 0.6
MIN_COMPONENT_PIXELS = 12


@dataclass(frozen=True)
class Reading:
    """What the judge reads from one image; `None` marks an attribute it cannot read."""

    shape: str | None
    color: str | None
    background: str | None
    size: str | None
    position: str | None
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 inclusive
    template_iou: float = 0.0

    def matches(self, expected: Attributes) -> dict[str, bool]:
        """Per attribute: does the reading equal the expected value?"""
        return {name: getattr(self, name) == getattr(expected, name) for name in ATTRIBUTES}

    @property
    def strict_size(self) -> str | None:
        """The size whose width range in the spec (`shapes.SIZES`) holds the bounding-box width, else None."""
        if self.bbox is None:
            return None
        width = self.bbox[2] - self.bbox[0] + 1
        return next((name for name, (low, high) in SIZES.items() if low <= width <= high), None)

    def strict_matches(self, expected: Attributes) -> dict[str, bool]:
        """`matches` with the strict size reading."""
        return {**self.matches(expected), "size": self.strict_size == expected.size}


def quantize(image: Image.Image | np.ndarray) -> np.ndarray:
    """Index (H, W) of each pixel's nearest palette colour; `image` is PIL or a uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"Expected an RGB image (PIL, or a uint8 array of shape (H, W, 3)); got {image.dtype} {image.shape}."
        )
    pixels = image.astype(np.float32)
    distances = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def _border(labels: np.ndarray) -> np.ndarray:
    return np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return ndimage.binary_fill_holes(components == 1 + int(sizes.argmax()))


def _templates(width: int, height: int) -> dict[str, np.ndarray]:
    """Disc, square and upward triangle filling a width x height box, sampled at pixel centres."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u, v = xs / width, ys / height  # in (0, 1); v grows downwards
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,  # apex at the top centre, base along the bottom
    }


def _read_shape(component: np.ndarray, bbox: tuple[int, int, int, int]) -> tuple[str | None, float]:
    x0, y0, x1, y1 = bbox
    crop = component[y0 : y1 + 1, x0 : x1 + 1]
    scores = {}
    for name, template in _templates(x1 - x0 + 1, y1 - y0 + 1).items():
        scores[name] = float((crop & template).sum() / (crop | template).sum())
    best = max(scores, key=scores.get)
    return (best if scores[best] >= MIN_TEMPLATE_IOU else None), scores[best]


def _read_position(bbox: tuple[int, int, int, int]) -> str | None:
    x0, y0, x1, y1 = bbox
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    distances = {name: float(np.hypot(*(centre - np.array(anchor)))) for name, anchor in POSITIONS.items()}
    nearest = min(distances, key=distances.get)
    return nearest if distances[nearest] <= MAX_POSITION_ERROR else None


def _mode(values: np.ndarray) -> int:
    return int(np.bincount(values.ravel(), minlength=len(PALETTE)).argmax())


def read_attributes(image: Image.Image | np.ndarray) -> Reading:
    """Read shape, colour, background, size and position from one RGB image (see module docstring)."""
    labels = quantize(image)
    background = _mode(_border(labels))
    component = _largest_component(labels != background)
    if component.sum() < MIN_COMPONENT_PIXELS:
        return Reading(None, None, PALETTE_NAMES[background], None, None)
    ys, xs = np.nonzero(component)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    interior = ndimage.binary_erosion(component)
    color = _mode(labels[interior if interior.any() else component])
    shape, iou = _read_shape(component, bbox)
    width = bbox[2] - bbox[0] + 1
    return Reading(
        shape=shape,
        color=PALETTE_NAMES[color],
        background=PALETTE_NAMES[background],
        size="small" if width < SIZE_THRESHOLD else "large",
        position=_read_position(bbox),
        bbox=bbox,
        template_iou=iou,
    )


@dataclass(frozen=True)
class Scores:
    """Accuracies over a set of judged images: per attribute and all five at once, and the same
    two with the strict size reading."""

    count: int
    per_attribute: dict[str, float]
    all_correct: float
    size_strict: float
    all_correct_strict: float

    def as_row(self) -> dict[str, float]:
        return {**self.per_attribute, "all": self.all_correct, "size strict": self.size_strict,
                "all strict": self.all_correct_strict}


def score(pairs: Iterable[tuple[Image.Image | np.ndarray, Attributes]]) -> Scores:
    """Judge (image, expected attributes) pairs; return per-attribute and all-correct accuracy.

    An attribute missing from a prompt is not supported here: pass all five expected values.
    """
    readings = [(read_attributes(image), expected) for image, expected in pairs]
    if not readings:
        raise ValueError("score() needs at least one (image, attributes) pair.")
    matches = [reading.matches(expected) for reading, expected in readings]
    strict = [reading.strict_matches(expected) for reading, expected in readings]
    return Scores(
        count=len(matches),
        per_attribute={name: float(np.mean([m[name] for m in matches])) for name in ATTRIBUTES},
        all_correct=float(np.mean([all(m.values()) for m in matches])),
        size_strict=float(np.mean([m["size"] for m in strict])),
        all_correct_strict=float(np.mean([all(m.values()) for m in strict])),
    )


def errors(pairs: Sequence[tuple[Image.Image | np.ndarray, Attributes]]) -> list[tuple[int, Attributes, Reading]]:
    """The pairs the judge reads differently from the expected attributes: (index, expected, reading)."""
    wrong = []
    for index, (image, expected) in enumerate(pairs):
        reading = read_attributes(image)
        if not all(reading.matches(expected).values()):
            wrong.append((index, expected, reading))
    return wrong


__all__ = ["ATTRIBUTES", "IMAGE_SIZE", "Reading", "Scores", "errors", "quantize", "read_attributes", "score"]
