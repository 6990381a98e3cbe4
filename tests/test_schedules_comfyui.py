"""The noise-level schedules people ask for, against their definitions (ComfyUI's, A1111's, the papers' tables)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scheduler_helpers import BASE_CONFIG, sample_loop

from custom_schedulers import grids, registry

SD = dict(BASE_CONFIG)


def _levels(sigma_schedule: str, num_steps: int, config=SD) -> torch.Tensor:
    scheduler = registry.build("euler", config, sigma_schedule=sigma_schedule)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.double()


def test_align_your_steps_is_the_published_table_at_10_steps():
    """Sabour et al. 2024, Table 3 (SD 1.5 and SDXL): 10 steps visit the first 10 levels, then sigma = 0."""
    for name, table in grids.ALIGN_YOUR_STEPS.items():
        torch.testing.assert_close(_levels(name, 10), torch.tensor([*table[:-1], 0.0], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


def test_align_your_steps_interpolates_log_linearly():
    levels = _levels("align-your-steps", 20)[:-1]
    table = torch.tensor(grids.ALIGN_YOUR_STEPS["align-your-steps"], dtype=torch.float64)
    assert levels[0] == pytest.approx(14.615) and len(levels) == 20
    torch.testing.assert_close(levels[::2], table[:-1], rtol=1e-6, atol=1e-6)  # every table level, twice as dense
    torch.testing.assert_close(levels[1::2].log(), (table[:-1].log() + table[1:].log()) / 2, rtol=1e-6, atol=1e-6)


def test_kl_optimal_is_uniform_in_arctan_sigma():
    levels = _levels("kl-optimal", 8)[:-1]
    steps = levels.atan().diff()
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-5, atol=1e-7)
    sigma_max = float((1 / registry.build("euler", SD).alphas_cumprod[-1] - 1) ** 0.5)
    assert levels[0] == pytest.approx(sigma_max, rel=1e-5) and levels[-1] == pytest.approx(0.0292, abs=1e-4)


def test_timestep_schedules_are_comfyuis():
    """ComfyUI comfy/samplers.py: simple_scheduler, normal_scheduler (sgm=True/False), beta_scheduler."""
    T, N = 1000, 7
    expected = {
        "simple": [T - 1 - int(i * (T / N)) for i in range(N)],
        "sgm-uniform": np.linspace(T - 1, 0, N + 1)[:-1],
        "normal": np.linspace(T - 1, 0, N),
    }
    for name, timesteps in expected.items():
        np.testing.assert_allclose(grids.schedule_timesteps(name, N, T).numpy(), timesteps, rtol=1e-12)
    from scipy.stats import beta

    np.testing.assert_allclose(np.rint(grids.schedule_timesteps("beta", N, T).numpy()),
                               np.rint(beta.ppf(1 - np.linspace(0, 1, N, endpoint=False), 0.6, 0.6) * (T - 1)))


@pytest.mark.parametrize("sigma_schedule", ["beta", "kl-optimal", "sgm-uniform", "simple", "normal",
                                            "align-your-steps", "align-your-steps-sdxl"])
@pytest.mark.parametrize("name", ["euler", "dpmpp-2m", "heun", "unipc"])
def test_every_schedule_samples(name, sigma_schedule):
    scheduler = registry.build(name, SD, sigma_schedule=sigma_schedule)
    scheduler.set_timesteps(6)
    assert scheduler.num_inference_steps == 6 and torch.all(scheduler.sigmas[:-1] > 0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sample_loop(scheduler, x)[1]).all()


def test_align_your_steps_refuses_a_flow_schedule():
    flow = dict(BASE_CONFIG, beta_schedule="flow", prediction_type="flow")
    with pytest.raises(ValueError, match="VP schedule"):
        registry.build("euler", flow, sigma_schedule="align-your-steps").set_timesteps(10)
    assert math.isfinite(float(_levels("beta", 5, flow)[0]))
