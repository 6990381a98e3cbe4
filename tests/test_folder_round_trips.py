"""Folders that load back: ours <-> stock diffusers, save_pretrained / from_pretrained / from_pipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from custom_schedulers import registry
from ldm_pipeline import LatentTextToImagePipeline, load_pipeline
from training.tiny_models import tiny_sd_components

PIPE_KEYS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
REPO = Path(__file__).resolve().parents[1]


def ours():
    return LatentTextToImagePipeline(**{k: v for k, v in tiny_sd_components().items() if k in PIPE_KEYS})


def ours_image(pipe):
    return pipe("a red circle", width=32, height=32, num_inference_steps=2, seed=0, output_type="np",
                progress_bar=False).images[0]


def stock_image(pipe):
    import torch

    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", width=32, height=32, num_inference_steps=2, output_type="np",
                generator=[torch.Generator().manual_seed(0)]).images[0]


def test_our_folder_is_a_stock_sd_folder_that_stock_diffusers_opens_without_our_code(tmp_path):
    pipe = ours()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    # a fresh interpreter that never imports ldm_pipeline or custom_schedulers
    script = ("import sys, numpy, torch; from diffusers import DiffusionPipeline; "
              f"p = DiffusionPipeline.from_pretrained({str(tmp_path)!r}); p.set_progress_bar_config(disable=True); "
              "assert type(p).__name__ == 'StableDiffusionPipeline' and p.safety_checker is None; "
              "img = p('a red circle', width=32, height=32, num_inference_steps=2, output_type='np', "
              "generator=[torch.Generator().manual_seed(0)]).images[0]; "
              "assert not any(m.startswith(('ldm_pipeline', 'custom_schedulers')) for m in sys.modules); "
              f"numpy.save({str(tmp_path / 'stock.npy')!r}, img)")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=600,
                   env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    np.testing.assert_allclose(np.load(tmp_path / "stock.npy"), ours_image(pipe), atol=1e-5)


def test_load_pipeline_opens_folders_saved_by_stock_and_by_ours(tmp_path):
    reference = ours_image(ours())
    StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False).save_pretrained(tmp_path / "stock")
    ours().save_pretrained(tmp_path / "ours")
    for folder in ("stock", "ours"):
        loaded = load_pipeline(str(tmp_path / folder))
        assert loaded.safety_checker is None
        np.testing.assert_allclose(ours_image(loaded), reference, atol=1e-5)
        again = LatentTextToImagePipeline.from_pretrained(tmp_path / folder)
        np.testing.assert_allclose(ours_image(again), reference, atol=1e-5)


@pytest.mark.parametrize("saver", ["ours", "stock"])
def test_folders_holding_our_schedulers_load_back_with_their_config(tmp_path, saver):
    pipe = ours() if saver == "ours" else StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False)
    pipe.scheduler = registry.build("dpmpp-2m", pipe.scheduler.config, schedule="karras")
    config = public(pipe.scheduler.config)
    assert "karras" in json.dumps(config)  # the schedule is in the config, so a silent loss would show
    pipe.save_pretrained(tmp_path)
    for loaded in (load_pipeline(str(tmp_path)), DiffusionPipeline.from_pretrained(tmp_path)):
        assert type(loaded.scheduler) is type(pipe.scheduler)
        assert public(loaded.scheduler.config) == config


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_from_pipe_both_ways_shares_the_components_and_gives_the_same_image():
    pipe = ours()
    stock = StableDiffusionPipeline.from_pipe(pipe)
    assert stock.unet is pipe.unet and stock.safety_checker is None
    np.testing.assert_allclose(stock_image(stock), ours_image(pipe), atol=1e-5)
    back = LatentTextToImagePipeline.from_pipe(stock)
    assert back.unet is pipe.unet
    np.testing.assert_allclose(ours_image(back), ours_image(pipe), atol=1e-6)


def test_set_progress_bar_config_works_as_in_diffusers(capfd):
    pipe = ours()
    small = dict(width=32, height=32, num_inference_steps=2, output_type="np", seed=0)
    pipe("a circle", **small)
    assert "denoising" in capfd.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe("a circle", **small)
    assert "denoising" not in capfd.readouterr().err
    pipe.set_progress_bar_config(desc="my steps")
    pipe("a circle", **small)
    assert "my steps" in capfd.readouterr().err
    pipe("a circle", progress_bar=False, **small)
    assert "my steps" not in capfd.readouterr().err
