"""Captions: kohya folders (N_name repeats, .txt/.caption files), tag shuffle with keep_tokens, tag dropout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training.captions import CaptionVariation, vary_tags
from training.tokenizer import build_clip_tokenizer

TAGS = "sks, dog, red collar, grass, sunny, park"


def test_keep_tokens_stay_in_front_and_shuffle_permutes_the_rest():
    outputs = {vary_tags(TAGS, np.random.default_rng(i), keep_tokens=2, shuffle=True) for i in range(50)}
    assert len(outputs) > 10
    for caption in outputs:
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(TAGS.split(", "))
    assert vary_tags(TAGS, np.random.default_rng(0)) == TAGS  # nothing asked, nothing changed


def test_tag_dropout_rate_and_kept_tags_never_dropped():
    rate = 0.3
    kept = Counter()
    for i in range(2000):
        tags = vary_tags(TAGS, np.random.default_rng(i), keep_tokens=1, tag_dropout=rate).split(", ")
        assert tags[0] == "sks"
        kept.update(tags[1:])
    survival = sum(kept.values()) / (2000 * 5)
    assert abs(survival - (1 - rate)) < 0.02  # binomial sd ~ 0.0065


def test_caption_variation_is_a_function_of_the_position(tmp_path):
    tokenizer = build_clip_tokenizer(["sks", "dog", "red", "collar", "grass", "sunny", "park"], tmp_path, 16)
    variation = CaptionVariation([TAGS], tokenizer, seed=1, keep_tokens=1, shuffle=True, tag_dropout=0.2)
    index, positions = torch.zeros(8, dtype=torch.long), torch.arange(8)
    first = variation.ids(index, positions)
    assert torch.equal(first, variation.ids(index, positions))
    assert len({tuple(row.tolist()) for row in first}) > 1
    with pytest.raises(ValueError, match="--caption_tag_dropout_rate"):
        CaptionVariation([TAGS], tokenizer, 0, tag_dropout=1.0)


def kohya_folder(root):
    """3_sks dog/ with .caption files, 1_park/ with .txt files and one image with no caption file."""
    for folder, repeats_name, files in [("3_sks dog", ".caption", ["a", "b"]), ("1_park", ".txt", ["c", "d"])]:
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(files):
            Image.new("RGB", (24 + 8 * i, 24), (50 * i, 90, 10)).save(root / folder / f"{name}.png")
            (root / folder / f"{name}{repeats_name}").write_text(f"{name} tag, photo\n")
    Image.new("RGB", (24, 24)).save(root / "1_park" / "nocaption.png")


def test_kohya_folders_give_repeats_and_caption_files(tmp_path):
    kohya_folder(tmp_path)
    sources, _ = data.folder_sources(str(tmp_path))
    by_name = {s.path.stem: s for s in sources}
    assert {n: (s.caption, s.repeats) for n, s in by_name.items()} == {
        "a": ("a tag, photo", 3), "b": ("b tag, photo", 3), "c": ("c tag, photo", 1), "d": ("d tag, photo", 1),
        "nocaption": ("park", 1),  # the folder name is the caption
    }
    order = data.BatchOrder(len(sources), 3, seed=0, repeats=tuple(s.repeats for s in sources))
    assert order.epoch_size == 9
    epoch = [i for step in range(3) for i, _ in order.keys(step)]
    assert Counter(sources[i].path.stem for i in epoch) == {"a": 3, "b": 3, "c": 1, "d": 1, "nocaption": 1}


def test_training_with_tag_variation_on_kohya_folders_resumes_bit_exact(tmp_path):
    from test_train import args, summary

    from training.train import main

    folder = tmp_path / "images"
    kohya_folder(folder)
    extra = ["--dataset", "folder", "--train_data_dir", str(folder), "--num_validation_samples", "1",
             "--train_batch_size", "2", "--shuffle_caption", "--keep_tokens", "1", "--caption_tag_dropout_rate", "0.3",
             "--checkpointing_steps", "2", "--lr_scheduler", "constant", "--learning_rate", "1e-3",
             "--train_text_encoder", "--record_data_order"]
    main(args(tmp_path / "full", *extra, steps=4))
    main(args(tmp_path / "parted", *extra, steps=2))
    main(args(tmp_path / "parted", *extra, "--resume_from_checkpoint", "latest", steps=4))
    assert summary(tmp_path / "parted")["loss_history"] == summary(tmp_path / "full")["loss_history"][2:]
    lines = (tmp_path / "full" / "data_order-rank0.jsonl").read_text().splitlines()
    assert len(lines) == 4
    plain = [a for a in extra if a not in ("--shuffle_caption", "--caption_tag_dropout_rate", "0.3")]
    main(args(tmp_path / "plain", *plain, steps=4))  # the variation reaches the text encoder: other losses
    assert summary(tmp_path / "plain")["loss_history"] != summary(tmp_path / "full")["loss_history"]
