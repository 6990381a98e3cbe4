"""Drop-in: each of our schedulers runs inside a stock diffusers `StableDiffusionPipeline`
built from tiny random components (no download), producing finite, deterministic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from custom_schedulers import CosineScheduler, RectifiedFlowScheduler, ZeroTerminalSNRScheduler, registry
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline(**tiny_sd_components(seed=0), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    return pipe(
        "a red circle", height=16, width=16, guidance_scale=3.0, output_type="np",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


SCHEDULERS = [
    *[pytest.param(lambda config, n=name: registry.build(n, config), id=name) for name in registry.OURS],
    pytest.param(lambda config: CosineScheduler.from_config(config), id="CosineScheduler"),
    pytest.param(lambda config: ZeroTerminalSNRScheduler.from_config(config, prediction_type="v_prediction"),
                 id="ZeroTerminalSNRScheduler"),
    pytest.param(lambda config: RectifiedFlowScheduler.from_config(config), id="RectifiedFlowScheduler"),
]


@pytest.mark.parametrize("make_scheduler", SCHEDULERS)
def test_runs_in_a_stock_stable_diffusion_pipeline(pipe, make_scheduler):
    pipe.scheduler = make_scheduler(SD15_SCHEDULER_CONFIG)  # what users do with pipe.scheduler.config
    images = _generate(pipe, num_inference_steps=3)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(_generate(pipe, num_inference_steps=3), images)  # same seed, same image


@pytest.mark.parametrize("grid", [{"timesteps": [999, 600, 250]}, {"sigmas": [14.6, 2.0, 0.3]}])
def test_custom_grids_through_the_pipeline(pipe, grid):
    pipe.scheduler = registry.build("dpmpp-2m", SD15_SCHEDULER_CONFIG)
    images = _generate(pipe, **grid)
    assert np.isfinite(images).all()
    assert pipe.scheduler.num_inference_steps == 3
