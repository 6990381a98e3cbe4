"""DreamBooth with prior preservation: class images generated once and cached; the prior term, weighted."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_data import write_folder
from test_train import args, summary

from training.dreambooth import prior_weights
from training.train import main


def test_prior_weights_turn_the_batch_mean_into_instance_plus_weighted_class_loss():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    is_prior = torch.tensor([False, False, True, True, True])
    weighted = (per_sample * prior_weights(is_prior, 0.5)).mean()
    assert weighted.item() == pytest.approx(2.0 + 0.5 * 20.0)  # diffusers: mse(instance) + w * mse(class)


def dreambooth_args(tmp_path, out, *extra, steps=1):
    folder = tmp_path / "instance"
    if not folder.exists():
        write_folder(folder, {f"{i}.png": "ignored caption" for i in range(3)}, metadata=False)
    return args(out, "--train_data_dir", str(folder), "--num_validation_samples", "1", "--train_batch_size", "2",
                "--instance_prompt", "a sks circle", "--with_prior_preservation", "--class_prompt", "a red circle",
                "--num_class_images", "3", "--class_data_dir", str(tmp_path / "class"),
                "--validation_inference_steps", "2", "--record_data_order", *extra, steps=steps)


def test_class_images_are_generated_once_and_the_prior_term_is_weighted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        main(dreambooth_args(tmp_path, tmp_path / "w1"))
    assert "Generating 3 class images of 'a red circle'" in caplog.text
    [folder] = list((tmp_path / "class").iterdir())
    images = sorted(folder.glob("*.png"))
    assert len(images) == 3 and json.loads((folder / "class_images.json").read_text())["count"] == 3
    stamps = [p.stat().st_mtime_ns for p in images]
    caplog.clear()
    losses = {}
    with caplog.at_level(logging.INFO, logger="training"):
        for weight in ("0", "1", "2"):
            main(dreambooth_args(tmp_path, tmp_path / f"w{weight}b", "--prior_loss_weight", weight))
            losses[weight] = summary(tmp_path / f"w{weight}b")["loss_history"][0][1]
    assert "Generating" not in caplog.text and "Using 3 cached class images" in caplog.text
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))] == stamps  # reused, not rewritten
    # The loss is instance + w * class: linear in w, with a non-zero class term.
    assert losses["1"] != pytest.approx(losses["0"], rel=1e-3)
    assert losses["2"] - losses["1"] == pytest.approx(losses["1"] - losses["0"], rel=1e-4)
    # Each micro-batch: 2 instance images (indices 0-1 of the 2 training images), then 2 class images.
    batch = json.loads((tmp_path / "w1b" / "data_order-rank0.jsonl").read_text().splitlines()[0])
    assert all(i < 2 for i in batch["index"][:2]) and all(i >= 2 for i in batch["index"][2:])


def test_prior_preservation_needs_its_prompts(tmp_path):
    with pytest.raises(ValueError, match="--with_prior_preservation needs --class_prompt"):
        main(args(tmp_path / "x", "--with_prior_preservation"))
