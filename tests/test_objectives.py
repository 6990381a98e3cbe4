"""Min-SNR weights, targets, noise levels: closed forms and diffusers' own implementation."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from custom_schedulers import parameterization
from custom_schedulers.schedules import make_schedule
from training.objectives import Objective, build_schedule, check_objective, logit_normal_density, min_snr_weights

GAMMA = 5.0
SNRS = torch.tensor([0.0, 1e-6, 0.5, 1.0, 4.999, 5.0, 7.0, 1e3, 1e12, math.inf], dtype=torch.float64)


def reference(snr: float, prediction_type: str) -> float:
    """The formulas as written in the issue / Hang et al. 2023, with limits at 0 and inf taken by hand."""
    m = min(snr, GAMMA)
    if prediction_type == "epsilon":
        return 1.0 if snr <= GAMMA else GAMMA / snr
    if prediction_type == "v_prediction":
        return 0.0 if math.isinf(snr) else m / (snr + 1)
    if prediction_type == "sample":
        return m
    sigma = 1 / (1 + math.sqrt(snr))  # flow: sqrt(SNR) = (1 - sigma) / sigma
    return 0.0 if math.isinf(snr) else m * sigma**2


@pytest.mark.parametrize("prediction_type", parameterization.PREDICTION_TYPES)
def test_min_snr_weights_match_formulas_including_zero_and_infinite_snr(prediction_type):
    weights = min_snr_weights(SNRS, GAMMA, prediction_type)
    assert torch.isfinite(weights).all()
    expected = torch.tensor([reference(float(s), prediction_type) for s in SNRS], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_example_script(prediction_type):
    """diffusers' train_text_to_image.py: min(snr, g) / snr (epsilon), / (snr + 1) (v) on SD's schedule."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.arange(0, 1000, 37)
    snr = compute_snr(scheduler, timesteps).double()
    theirs = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    theirs = theirs / snr if prediction_type == "epsilon" else theirs / (snr + 1)
    torch.testing.assert_close(min_snr_weights(snr, GAMMA, prediction_type), theirs, rtol=1e-6, atol=0)


def test_flow_weight_equals_x0_space_weight():
    """Loss on u weighted by w_flow equals min(SNR, g) times the x0 error: |x0_err|^2 = sigma^2 |u_err|^2."""
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    alpha = 1 - sigma
    x0, eps, u_hat = torch.randn(3, 4, 8, dtype=torch.float64).unbind(0)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    x0_hat = parameterization.to_x0(u_hat, x_t, alpha, sigma, "flow")
    snr = (alpha / sigma) ** 2
    lhs = min_snr_weights(snr, GAMMA, "flow") * ((u_hat - (eps - x0)) ** 2).sum(1)
    rhs = snr.clamp(max=GAMMA) * ((x0_hat - x0) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "flow"])
def test_zero_terminal_snr_weights_are_finite_and_the_floor_trains_the_pure_noise_step(prediction_type):
    zero_snr = prediction_type != "flow"
    schedule = build_schedule(prediction_type, "scaled_linear", 1000, zero_terminal_snr=zero_snr)
    if prediction_type == "flow":
        levels = Objective(schedule, "flow").flow_levels(torch.linspace(0.01, 1.0, 100, dtype=torch.float64))
    else:
        levels = Objective(schedule, prediction_type).vp_levels(torch.arange(1000))
    _, alpha, sigma = levels
    snr = (alpha / sigma) ** 2
    assert snr[-1] == 0  # the schedule reaches pure noise
    plain = Objective(schedule, prediction_type, snr_gamma=GAMMA).loss_weights(alpha, sigma)
    floored = Objective(schedule, prediction_type, snr_gamma=GAMMA, snr_floor=1.0).loss_weights(alpha, sigma)
    assert torch.isfinite(plain).all() and torch.isfinite(floored).all()
    assert plain[-1] == 0  # the paper's weight: the pure-noise step is never trained
    assert floored[-1] == pytest.approx(1.0)  # truncated SNR: x0-space weight max(SNR, 1) -> 1 at SNR = 0
    high = snr >= 1
    torch.testing.assert_close(floored[high], plain[high])  # unchanged where SNR >= 1
    assert (floored >= plain).all()


def test_epsilon_weights_ignore_the_floor():
    snr = torch.tensor([0.0, 0.5, 10.0], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weights(snr, GAMMA, "epsilon", snr_floor=1.0), min_snr_weights(snr, GAMMA, "epsilon"))


def test_weights_use_snr_after_zero_terminal_rescale():
    plain = Objective(make_schedule("scaled_linear"), "v_prediction", snr_gamma=GAMMA)
    rescaled = Objective(make_schedule("scaled_linear", rescale_betas_zero_snr=True), "v_prediction", snr_gamma=GAMMA)
    t = torch.tensor([600])
    w_plain = plain.loss_weights(*plain.vp_levels(t)[1:])
    w_rescaled = rescaled.loss_weights(*rescaled.vp_levels(t)[1:])
    expected = min_snr_weights(rescaled.schedule.snr[t], GAMMA, "v_prediction")
    torch.testing.assert_close(w_rescaled, expected)
    assert not torch.allclose(w_plain, w_rescaled)


@pytest.mark.parametrize("prediction_type", parameterization.PREDICTION_TYPES)
def test_targets_match_parameterization_module(prediction_type):
    schedule = build_schedule(prediction_type, "scaled_linear", 1000)
    objective = Objective(schedule, prediction_type)
    x0, noise = torch.randn(2, 4, 4, 8, 8).unbind(0)
    _, alpha, sigma = objective.sample_levels(4, torch.Generator().manual_seed(0))
    x_t = objective.noisy_input(x0, noise, alpha, sigma, torch.Generator())
    target = objective.target(x0, noise, alpha, sigma)
    a, s = alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + s * noise)
    torch.testing.assert_close(target, parameterization.target(prediction_type, x0, noise, a, s))
    # The target converts back to the true x0 (the conversions are consistent).
    torch.testing.assert_close(parameterization.to_x0(target, x_t, a, s, prediction_type), x0, atol=2e-4, rtol=1e-4)


def test_vp_noisy_input_matches_diffusers_add_noise():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    objective = Objective(make_schedule("scaled_linear"), "epsilon")
    x0, noise = torch.randn(2, 3, 4, 8, 8).unbind(0)
    t = torch.tensor([0, 500, 999])
    _, alpha, sigma = objective.vp_levels(t)
    ours = objective.noisy_input(x0, noise, alpha, sigma, torch.Generator())
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(objective.target(x0, noise, alpha, sigma), noise)
    v = Objective(make_schedule("scaled_linear"), "v_prediction").target(x0, noise, alpha, sigma)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-5)


def test_flow_levels_are_rectified_flow_with_diffusers_timesteps():
    objective = Objective(build_schedule("flow", "scaled_linear", 1000), "flow", flow_shift=3.0)
    timesteps, alpha, sigma = objective.flow_levels(torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sigma, 3 * torch.tensor([0.25, 0.5, 1.0]).double() / (1 + 2 * torch.tensor([0.25, 0.5, 1.0]).double()))
    torch.testing.assert_close(alpha + sigma, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(timesteps, sigma * 1000)


def test_logit_normal_sampling_matches_its_density():
    objective = Objective(build_schedule("flow", "scaled_linear", 1000), "flow", timestep_sampling="logit_normal",
                          logit_mean=0.5, logit_std=0.8)
    _, _, sigma = objective.sample_levels(200_000, torch.Generator().manual_seed(0))
    hist = torch.histc(sigma, bins=20, min=0, max=1) / (sigma.numel() / 20)
    centres = (torch.arange(20, dtype=torch.float64) + 0.5) / 20
    density = logit_normal_density(centres, 0.5, 0.8)
    torch.testing.assert_close(hist.double(), density, atol=0.06, rtol=0.05)


def test_logit_normal_vp_timesteps_are_floor_of_s_times_T():
    """VP with logit-normal levels: integer timesteps whose histogram follows the density of s = t/T."""
    objective = Objective(make_schedule(), "v_prediction", timestep_sampling="logit_normal", logit_mean=1.5, logit_std=1.0)
    timesteps, alpha, sigma = objective.sample_levels(200_000, torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.int64 and 0 <= timesteps.min() and timesteps.max() <= 999
    _, alpha_ref, sigma_ref = objective.vp_levels(timesteps)
    torch.testing.assert_close((alpha, sigma), (alpha_ref, sigma_ref))
    hist = torch.histc(timesteps.double(), bins=20, min=0, max=1000) / (timesteps.numel() / 20)
    density = logit_normal_density((torch.arange(20, dtype=torch.float64) + 0.5) / 20, 1.5, 1.0)
    torch.testing.assert_close(hist, density, atol=0.08, rtol=0.05)


def test_noise_offset_adds_per_channel_constant():
    objective = Objective(make_schedule(), "epsilon", noise_offset=0.5)
    plain = Objective(make_schedule(), "epsilon")
    x0 = torch.zeros(64, 4, 8, 8)
    offset = objective.sample_noise(x0, torch.Generator().manual_seed(1)) - plain.sample_noise(x0, torch.Generator().manual_seed(1))
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)  # constant over space
    assert abs(offset[:, :, 0, 0].std().item() - 0.5) < 0.08


def test_input_perturbation_changes_input_not_target():
    objective = Objective(make_schedule(), "epsilon", input_perturbation=0.1)
    x0, noise = torch.randn(2, 2, 4, 8, 8).unbind(0)
    _, alpha, sigma = objective.vp_levels(torch.tensor([500, 900]))
    x_t = objective.noisy_input(x0, noise, alpha, sigma, torch.Generator().manual_seed(0))
    clean = Objective(make_schedule(), "epsilon").noisy_input(x0, noise, alpha, sigma, torch.Generator())
    residual = (x_t - clean) / sigma.float().view(-1, 1, 1, 1)
    assert 0.07 < residual.std().item() < 0.13
    torch.testing.assert_close(objective.target(x0, noise, alpha, sigma), noise)


def test_singular_combinations_are_refused_with_advice():
    with pytest.raises(ValueError, match="v_prediction"):
        check_objective("epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="valid values"):
        check_objective("x0", zero_terminal_snr=False)
    check_objective("v_prediction", zero_terminal_snr=True)
