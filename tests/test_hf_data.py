"""Local Hugging Face datasets as training data: save_to_disk folders and load_dataset("imagefolder")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.hf_data import hf_sources

datasets = pytest.importorskip("datasets", reason="the datasets package is part of the [train] extra")


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (24 + 8 * i, 32), (40 * i, 100, 200)) for i in range(n)]


def test_saved_dataset_and_imagefolder_give_the_same_sources(tmp_path):
    captions = ["a red circle", "a blue square", "a green triangle"]
    saved = datasets.Dataset.from_dict({"picture": images(3), "caption": captions})
    saved = saved.cast_column("picture", datasets.Image())
    saved.save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    for i, image in enumerate(images(3)):
        image.save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                   for i, c in enumerate(captions)))
    from_disk = hf_sources(str(tmp_path / "saved"), "file_name", "caption")  # the only image column is found
    from_folder = hf_sources(str(folder))
    for sources in (from_disk, from_folder):
        assert [s.caption for s in sources] == captions
        for source, image in zip(sources, images(3)):
            assert source.size() == image.size and np.array_equal(np.asarray(source.load()), np.asarray(image))
    with pytest.raises(ValueError, match="--caption_column 'prompt'"):
        hf_sources(str(folder), caption_column="prompt")
    with pytest.raises(FileNotFoundError, match="--hf_dataset"):
        hf_sources(str(tmp_path / "missing"))


def test_training_on_a_saved_dataset_with_buckets_and_workers(tmp_path):
    from test_train import args, summary

    from training.train import main

    dataset = datasets.Dataset.from_dict({"image": images(6), "text": ["a red circle"] * 6})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    main(args(tmp_path / "run", "--hf_dataset", str(tmp_path / "saved"), "--num_validation_samples", "1",
              "--train_batch_size", "2", "--enable_bucket", "--bucket_reso_steps", "8", "--dataloader_num_workers", "1"))
    assert summary(tmp_path / "run")["steps"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["dataset"] == "folder"
