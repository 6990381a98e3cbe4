"""The prompt-adherence judge reads generator images right, and catches wrong ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from evaluation import judge
from training import shapes
from training.shapes import COLORS, POSITIONS, SIZES, Attributes


def _pairs(seed, count, split):
    return [(s.image, s.attributes) for s in shapes.generate(seed, count, split)]


@pytest.mark.parametrize("split, seed", [("train", 101), ("held_out", 102)])
def test_judge_reads_generator_images_right(split, seed):
    pairs = _pairs(seed, 600, split)
    result = judge.score(pairs)
    assert result.count == 600
    assert result.all_correct >= 0.998, judge.errors(pairs)[:5]
    assert min(result.per_attribute.values()) >= 0.998
    assert result.size_strict == 1.0 and result.all_correct_strict >= 0.998  # the generator keeps the spec's widths


def _square(width: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), COLORS["blue"])
    ImageDraw.Draw(image).rectangle((10, 10, 10 + width - 1, 10 + width - 1), fill=COLORS["red"])
    return image


@pytest.mark.parametrize("width, threshold, strict", [
    (14, "small", "small"), (18, "small", "small"), (19, "small", None), (22, "small", None),
    (23, "large", None), (27, "large", None), (28, "large", "large"), (34, "large", "large"), (36, "large", None),
])
def test_strict_size_reads_only_the_spec_widths(width, threshold, strict):
    reading = judge.read_attributes(_square(width))
    assert (reading.size, reading.strict_size) == (threshold, strict)
    expected = Attributes("square", "red", "blue", threshold, "top left")
    assert reading.strict_matches(expected)["size"] == (strict == threshold)


def _add_noise(image, sigma, rng):
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, sigma, (64, 64, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def test_judge_is_robust_to_generated_image_noise_and_soft_edges():
    rng = np.random.default_rng(0)
    samples = shapes.generate(103, 300, "all")
    noisy = [(_add_noise(s.image, 15, rng), s.attributes) for s in samples]
    blurred = [(s.image.filter(ImageFilter.GaussianBlur(1.0)), s.attributes) for s in samples]
    assert judge.score(noisy).all_correct >= 0.98
    assert judge.score(blurred).all_correct >= 0.98


def _other_value(attributes: Attributes, name: str) -> Attributes:
    values = {
        "shape": shapes.SHAPES, "color": tuple(COLORS), "background": tuple(COLORS),
        "size": tuple(SIZES), "position": tuple(POSITIONS),
    }[name]
    taken = {attributes.color, attributes.background}
    new = next(v for v in values if v != getattr(attributes, name) and (name not in ("color", "background") or v not in taken))
    return dataclasses.replace(attributes, **{name: new})


@pytest.mark.parametrize("name", judge.ATTRIBUTES)
def test_a_wrong_attribute_is_caught_and_only_that_one(name):
    for sample in shapes.generate(104, 40, "all"):
        expected = _other_value(sample.attributes, name)
        matches = judge.read_attributes(sample.image).matches(expected)
        assert matches == {a: a != name for a in judge.ATTRIBUTES}


def test_images_drawn_independently_of_the_generator():
    """Shapes drawn here (anti-aliased by supersampling, off-grid sizes) are read as drawn."""
    cases = [
        ("circle", "orange", "black", "large", "bottom right", (48, 47), 31),
        ("square", "white", "purple", "small", "top left", (17, 15), 16),
        ("triangle", "green", "yellow", "large", "center", (31, 33), 30),
        ("triangle", "blue", "white", "small", "top right", (47, 18), 15),
    ]
    for shape, color, background, size, position, (cx, cy), width in cases:
        scale = 4
        big = Image.new("RGB", (64 * scale, 64 * scale), COLORS[background])
        draw = ImageDraw.Draw(big)
        half_w = width * scale / 2
        half_h = half_w * (3**0.5 / 2 if shape == "triangle" else 1)
        box = (cx * scale - half_w, cy * scale - half_h, cx * scale + half_w, cy * scale + half_h)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx * scale, box[1])], fill=COLORS[color])
        image = big.resize((64, 64), Image.Resampling.LANCZOS)
        reading = judge.read_attributes(image)
        assert (reading.shape, reading.color, reading.background, reading.size, reading.position) == (
            shape, color, background, size, position,
        )


def test_blank_or_off_anchor_images_are_unreadable_not_guessed():
    blank = judge.read_attributes(Image.new("RGB", (64, 64), COLORS["blue"]))
    assert blank.background == "blue" and blank.shape is None and blank.position is None
    off_anchor = Image.new("RGB", (64, 64), COLORS["black"])
    ImageDraw.Draw(off_anchor).rectangle((24, 2, 39, 17), fill=COLORS["red"])  # top centre: no anchor
    assert judge.read_attributes(off_anchor).position is None


def test_score_counts_per_attribute_and_all_correct():
    samples = shapes.generate(105, 4, "all")
    pairs = [(s.image, s.attributes) for s in samples]
    pairs[1] = (pairs[1][0], _other_value(pairs[1][1], "position"))
    pairs[2] = (pairs[2][0], _other_value(_other_value(pairs[2][1], "shape"), "size"))
    result = judge.score(pairs)
    assert result.per_attribute == {"shape": 0.75, "color": 1.0, "background": 1.0, "size": 0.75, "position": 0.75}
    assert result.all_correct == 0.5
    assert (result.size_strict, result.all_correct_strict) == (0.75, 0.5)
    assert [index for index, _, _ in judge.errors(pairs)] == [1, 2]
    with pytest.raises(ValueError, match="at least one"):
        judge.score([])


def test_bad_image_is_a_clear_error():
    with pytest.raises(ValueError, match="RGB image"):
        judge.read_attributes(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="RGB image"):
        judge.read_attributes(np.zeros((64, 64, 3), dtype=np.float32))
