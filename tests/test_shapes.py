"""The `shapes` generator follows shared/specs/shapes-dataset.md: determinism, splits, attributes."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from training import shapes
from training.shapes import COLORS, POSITIONS, SIZES, Attributes

CANONICAL = re.compile(
    r"^a (small|large) (\w+) (circle|square|triangle) on a (\w+) background "
    r"at the (top left|top right|bottom left|bottom right|center)$"
)


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.image.tobytes())
        h.update(s.caption.encode())
    return h.hexdigest()


@pytest.mark.parametrize("split", ["train", "held_out", "all"])
def test_same_seed_same_bytes_different_seed_different_bytes(split):
    first = shapes.generate(seed=7, count=50, split=split, paraphrases=True)
    again = shapes.generate(seed=7, count=50, split=split, paraphrases=True)
    other = shapes.generate(seed=8, count=50, split=split, paraphrases=True)
    assert _digest(first) == _digest(again)
    assert [s.attributes for s in first] == [s.attributes for s in again]
    assert _digest(first) != _digest(other)


def test_a_prefix_of_a_longer_run_is_the_shorter_run():
    assert _digest(shapes.generate(3, 20)) == _digest(shapes.generate(3, 60)[:20])


def test_combination_counts_and_held_out_list_is_fixed():
    every = shapes.all_combinations()
    held_out = shapes.held_out_combinations()
    assert len(every) == len(set(every)) == 3 * 8 * 7 * 2 * 5 == 1680
    assert len(held_out) == len(set(held_out)) == 168 >= 0.10 * len(every)
    assert set(held_out) <= set(every)
    train = shapes.combinations("train")
    assert len(train) == 1680 - 168 and not set(train) & set(held_out)
    # The held-out list is part of the dataset's definition: pinned by its digest
    # (sha256 of the sorted canonical captions joined by newlines, seed HELD_OUT_SEED=20261122).
    captions = "\n".join(a.caption() for a in held_out).encode()
    assert hashlib.sha256(captions).hexdigest()[:16] == HELD_OUT_DIGEST


HELD_OUT_DIGEST = "17719d93c950d0aa"  # printed once from the list; changing the list must be deliberate


def test_train_split_never_yields_a_held_out_combination():
    samples = shapes.generate(seed=11, count=4000, split="train", paraphrases=True)
    assert not any(shapes.is_held_out(s.attributes) for s in samples)
    # ...while drawing from most of the training combinations, so the check is not vacuous.
    assert len({s.attributes for s in samples}) > 1000


def test_held_out_split_yields_only_held_out_combinations():
    samples = shapes.generate(seed=12, count=300, split="held_out")
    assert all(shapes.is_held_out(s.attributes) for s in samples)


def _check_sample_within_spec(sample) -> None:
    a = sample.attributes
    pixels = np.asarray(sample.image)
    assert sample.image.size == (64, 64) and sample.image.mode == "RGB" and pixels.dtype == np.uint8
    assert a.color != a.background and a.color in COLORS and a.background in COLORS
    is_background = (pixels == COLORS[a.background]).all(-1)
    is_shape = (pixels == COLORS[a.color]).all(-1)
    assert (is_background | is_shape).all(), "only the two palette colours (no anti-aliasing)"
    ys, xs = np.nonzero(is_shape)
    bbox = (xs.min(), ys.min(), xs.max(), ys.max())
    assert bbox == sample.bbox
    width, height = bbox[2] - bbox[0] + 1, bbox[3] - bbox[1] + 1
    low, high = SIZES[a.size]
    assert low <= width <= high
    centre = ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
    anchor = POSITIONS[a.position]
    assert abs(centre[0] - anchor[0]) <= 4 and abs(centre[1] - anchor[1]) <= 4
    fill = is_shape.sum() / (width * height)
    expected_fill = {"square": (0.99, 1.0), "circle": (0.70, 0.85), "triangle": (0.45, 0.62)}[a.shape]
    assert expected_fill[0] <= fill <= expected_fill[1], (a, fill)
    if a.shape == "triangle":  # equilateral-ish, pointing up: the top row is narrow, the bottom row full
        assert abs(height - width * 3**0.5 / 2) <= 1
        assert is_shape[bbox[1]].sum() <= 3 and is_shape[bbox[3]].sum() >= width - 1
    else:
        assert height == width


def test_attributes_within_spec():
    for sample in shapes.generate(seed=5, count=600, split="all"):
        _check_sample_within_spec(sample)
        assert sample.caption == sample.attributes.caption()
        assert CANONICAL.match(sample.caption)


def test_every_value_of_every_attribute_occurs():
    seen = {name: set() for name in ("shape", "color", "background", "size", "position")}
    for sample in shapes.generate(seed=6, count=600, split="train"):
        for name in seen:
            seen[name].add(getattr(sample.attributes, name))
    assert seen == {
        "shape": {"circle", "square", "triangle"}, "color": set(COLORS), "background": set(COLORS),
        "size": set(SIZES), "position": set(POSITIONS),
    }


def test_canonical_caption_is_exactly_the_spec_form():
    a = Attributes("circle", "red", "blue", "large", "top left")
    assert a.caption() == "a large red circle on a blue background at the top left"


def test_paraphrases_only_name_the_true_attributes():
    samples = shapes.generate(seed=9, count=400, split="train", paraphrases=True)
    captions = {s.caption for s in samples}
    assert sum(s.caption == s.attributes.caption() for s in samples) > 100  # canonical form is common
    assert len(captions) > 300
    for s in samples:
        a = s.attributes
        words = s.caption.split()
        assert a.shape in words and a.color in words
        other_colors = set(COLORS) - {a.color, a.background}
        assert not other_colors & set(words), s.caption
        assert not ({"small", "large"} - {a.size}) & set(words), s.caption
        if "background" in words:
            assert words[words.index("background") - 1] == a.background


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="count"):
        shapes.generate(0, -1)
    with pytest.raises(ValueError, match="split"):
        shapes.generate(0, 1, split="test")


def test_a_restricted_palette_yields_only_those_colours_and_never_a_held_out_combination():
    bright, dark = ["white", "yellow"], ["black", "blue"]
    samples = shapes.generate(3, 300, "train", paraphrases=True, colors=bright, backgrounds=dark)
    assert {s.attributes.color for s in samples} == set(bright)
    assert {s.attributes.background for s in samples} == set(dark)
    assert not any(shapes.is_held_out(s.attributes) for s in samples)
    assert len({s.attributes.position for s in samples}) == 5


def test_a_restricted_palette_names_bad_colours():
    with pytest.raises(ValueError, match="Unknown colors \\['pink'\\]; valid colours: red"):
        shapes.generate(0, 1, colors=["pink"])
    with pytest.raises(ValueError, match="No combination"):
        shapes.generate(0, 1, colors=["white"], backgrounds=["white"])
