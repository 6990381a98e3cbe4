"""The schedulers under the names users look for are compositions of a schedule and a solver."""

from __future__ import annotations

import math

import pytest
import torch

from custom_schedulers import (
    CosineScheduler,
    DPMSolverPlusPlusSampler,
    RectifiedFlowEulerSampler,
    RectifiedFlowScheduler,
    ZeroTerminalSNRScheduler,
)
from custom_schedulers.schedules import cosine_alpha_bar
from training.tiny_models import SD15_SCHEDULER_CONFIG


def test_cosine_scheduler_uses_the_cosine_schedule_even_from_an_sd_config():
    scheduler = CosineScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert isinstance(scheduler, DPMSolverPlusPlusSampler) and scheduler.config.beta_schedule == "squaredcos_cap_v2"
    t = torch.arange(1000, dtype=torch.float64)
    expected = cosine_alpha_bar((t + 1) / 1000) / cosine_alpha_bar(torch.zeros(1, dtype=torch.float64))
    # Away from the 0.999 beta cap (last few steps) alpha-bar is the closed form (Nichol & Dhariwal eq. 17).
    torch.testing.assert_close(scheduler.schedule.alphas_cumprod[:990], expected[:990], rtol=1e-9, atol=1e-12)


def test_zero_terminal_snr_scheduler():
    scheduler = ZeroTerminalSNRScheduler()
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.schedule.alphas_cumprod[-1] == 0
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[0] == 999 and scheduler.noise_level_at(0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="v_prediction"):
        ZeroTerminalSNRScheduler.from_config(SD15_SCHEDULER_CONFIG, prediction_type="epsilon").set_timesteps(10)


def test_rectified_flow_scheduler():
    scheduler = RectifiedFlowScheduler.from_config(SD15_SCHEDULER_CONFIG, shift=3.0)
    assert isinstance(scheduler, RectifiedFlowEulerSampler)
    assert scheduler.config.beta_schedule == "flow" and scheduler.config.prediction_type == "flow"
    scheduler.set_timesteps(4)
    alpha, sigma = scheduler.noise_level_at(1)
    s = 3 * 0.75 / (1 + 2 * 0.75)  # trailing: t = 749 -> s = 0.75, shifted
    assert (alpha, sigma) == (pytest.approx(1 - s), pytest.approx(s))
    assert float(scheduler.timesteps[1]) == pytest.approx(1000 * s, abs=1)
    assert math.isclose(scheduler.noise_level_at(0)[1], 1.0)
