"""Noise schedules against their closed forms, and diffusers' own betas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from custom_schedulers import schedules


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_betas_match_diffusers(beta_schedule):
    ours = schedules.make_schedule(beta_schedule, 1000, 0.0001, 0.02)
    theirs = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=2e-5, atol=1e-7)


def test_cosine_alpha_bar_closed_form():
    """alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) pi/2) (Nichol & Dhariwal 2021, eq. 17)."""
    schedule = schedules.make_schedule("cosine", 1000)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    s = 0.008
    closed = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    capped = schedules.cosine_betas(1000) >= 0.999 - 1e-12
    assert capped.sum() <= 2  # only the last steps hit the 0.999 cap
    torch.testing.assert_close(schedule.alphas_cumprod[~capped], closed[~capped], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("betas", [schedules.linear_betas(1000), schedules.scaled_linear_betas(1000),
                                   schedules.cosine_betas(1000), schedules.sigmoid_betas(1000)])
def test_zero_terminal_snr_rescale(betas):
    """Lin et al. 2023, Alg. 1: alpha_bar_T = 0 exactly; SNR at t = 0 unchanged; sqrt(alpha_bar) affine in the original."""
    before, after = schedules.vp_schedule(betas), schedules.vp_schedule(schedules.rescale_zero_terminal_snr(betas))
    assert after.alphas_cumprod[-1] == 0 and after.zero_terminal_snr
    assert after.snr[0] == pytest.approx(float(before.snr[0]), rel=1e-9)
    a, b = before.alpha, after.alpha
    torch.testing.assert_close(b, (a - a[-1]) * a[0] / (a[0] - a[-1]), rtol=1e-9, atol=1e-12)


def test_flow_schedule_and_shift():
    """s = (t+1)/T, alpha = 1 - s, sigma = s; shift: s' = k s / (1 + (k-1) s) (SD3, Esser et al. 2024)."""
    flow = schedules.flow_schedule(1000, shift=3.0)
    s = torch.arange(1, 1001, dtype=torch.float64) / 1000
    shifted = 3 * s / (1 + 2 * s)
    torch.testing.assert_close(flow.sigma, shifted)
    torch.testing.assert_close(flow.alpha + flow.sigma, torch.ones(1000, dtype=torch.float64))
    assert flow.sigma[-1] == 1 and flow.zero_terminal_snr


def test_snr_helpers_and_log_snr_inverse():
    schedule = schedules.make_schedule("scaled_linear", 1000)
    torch.testing.assert_close(schedule.snr, schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
    t = torch.tensor([0.0, 10.5, 500.25, 999.0], dtype=torch.float64)
    lam = torch.stack([torch.lerp(schedule.log_snr[int(x)], schedule.log_snr[min(int(x) + 1, 999)], x - int(x))
                       for x in t])
    torch.testing.assert_close(schedules.timestep_from_log_snr(schedule, lam), t)


def test_analyze_schedules_reports_the_seed_quantities():
    report = schedules.analyze_schedules(1000)
    sd = report["scaled_linear (SD)"]
    assert sd["beta_min"] == pytest.approx(0.00085) and sd["beta_max"] == pytest.approx(0.012)
    assert sd["alpha_bar_final"] == pytest.approx(0.0047, abs=2e-4)
    assert report["scaled_linear + zero-terminal-SNR"]["alpha_bar_final"] == 0
    assert report["rectified flow"]["snr_end"] == 0
    for entry in report.values():
        assert 0 <= entry["snr_one_timestep"] < 1000 and entry["snr_start"] > entry["snr_end"]


def test_unknown_beta_schedule_names_valid_values():
    with pytest.raises(ValueError, match="valid values: linear, scaled_linear"):
        schedules.make_schedule("quadratic")
