"""Guidance: CFG and rescale formulas, dynamic schedules, the noise-level interval (counted UNet evaluations)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm_pipeline import LatentTextToImagePipeline
from ldm_pipeline.guidance import (
    Guidance,
    GuidanceInterval,
    GuidancePlan,
    NoiseLevels,
    as_interval,
    cfg,
    guidance_scale_at,
    rescale_guidance,
)
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components

SMALL = {"width": 32, "height": 32, "progress_bar": False, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe():
    c = tiny_sd_components()
    return LatentTextToImagePipeline(**{k: c[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})


def test_cfg_formula():
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    torch.testing.assert_close(cfg(u, c, 0.0), u)
    torch.testing.assert_close(cfg(u, c, 7.5), u + 7.5 * (c - u))


def test_rescale_matches_formula_and_diffusers():
    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    phi = 0.7
    out = rescale_guidance(guided, cond, phi)
    # Lin et al. 2023, eqs. 15-16, written out per sample
    for i in range(2):
        expected = phi * guided[i] * cond[i].std() / guided[i].std() + (1 - phi) * guided[i]
        torch.testing.assert_close(out[i], expected)
    torch.testing.assert_close(out, rescale_noise_cfg(guided, cond, guidance_rescale=phi))
    torch.testing.assert_close(rescale_guidance(guided, cond, 1.0).std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "schedule, tau, expected",
    [
        ("constant", 0.3, 7.0), ("linear_up", 1.0, 1.0), ("linear_up", 0.0, 7.0), ("linear_up", 0.5, 4.0),
        ("linear_down", 1.0, 7.0), ("linear_down", 0.25, 2.5), ("cosine", 1.0, 1.0), ("cosine", 0.0, 7.0),
        ("cosine", 0.5, 4.0), ("linear_down_to_half", 1.0, 7.0), ("linear_down_to_half", 0.0, 3.5),
        ("linear_down_to_half", 0.5, 5.25),
    ],
)
def test_schedule_values(schedule, tau, expected):
    assert guidance_scale_at(7.0, schedule, tau, min_scale=1.0) == pytest.approx(expected)


def test_old_schedule_name_seed_is_read_as_linear_down_to_half():
    old = Guidance(scale=7.0, schedule="seed")
    assert old == Guidance(scale=7.0, schedule="linear_down_to_half")
    assert old.describe()["schedule"] == "linear_down_to_half" and old.scale_at(500) == pytest.approx(5.25)


def test_callable_schedule_gets_t_over_T():
    seen = []
    g = Guidance(scale=5, schedule=lambda tau: seen.append(tau) or 2.0, num_train_timesteps=1000)
    assert g.scale_at(250) == 2.0 and seen == [0.25]


def test_constant_dynamic_schedule_equals_plain_cfg(pipe):
    plain = pipe("a red circle", guidance_scale=6.0, seed=3, num_inference_steps=3, **SMALL).images
    as_callable = pipe("a red circle", guidance_schedule=lambda tau: 6.0, seed=3, num_inference_steps=3,
                       **SMALL).images
    flat_ramp = pipe("a red circle", guidance_scale=6.0, guidance_schedule="linear_up", guidance_min_scale=6.0,
                     seed=3, num_inference_steps=3, **SMALL).images
    np.testing.assert_allclose(as_callable, plain, atol=1e-6)
    np.testing.assert_allclose(flat_ramp, plain, atol=1e-6)
    ramp = pipe("a red circle", guidance_scale=6.0, guidance_schedule="linear_up", seed=3, num_inference_steps=3,
                **SMALL).images
    assert np.abs(ramp - plain).max() > 1e-4


def test_noise_levels_match_scheduler_sigmas():
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    levels = NoiseLevels.from_scheduler(scheduler)
    abar = scheduler.alphas_cumprod.double()
    for t in (0, 1, 500, 999):
        assert levels.sigma(t) == pytest.approx(math.sqrt((1 - abar[t]) / abar[t]), rel=1e-4)  # diffusers: float32
    # fractional timesteps: linear in t between grid sigmas, as diffusers' Euler interpolates
    s10, s11 = (math.sqrt((1 - abar[t]) / abar[t]) for t in (10, 11))
    assert levels.sigma(10.25) == pytest.approx(0.75 * s10 + 0.25 * s11, rel=1e-4)
    assert levels.sigma(999) == pytest.approx(14.6146, rel=1e-4)  # SD 1.5's sigma_max


def test_fractional_timesteps_match_euler_sigmas():
    scheduler = EulerDiscreteScheduler.from_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "linspace"})
    scheduler.set_timesteps(7)
    levels = NoiseLevels.from_scheduler(scheduler)
    assert any(float(t) % 1 for t in scheduler.timesteps)  # linspace gives fractional timesteps
    for t, sigma in zip(scheduler.timesteps, scheduler.sigmas):
        assert levels.sigma(t) == pytest.approx(float(sigma), rel=1e-4)


def test_rectified_flow_noise_level_is_s_over_one_minus_s():
    from custom_schedulers.schedules import flow_sigmas

    class Flow:
        config = {"beta_schedule": "flow", "num_train_timesteps": 1000, "shift": 3.0}

    levels = NoiseLevels.from_scheduler(Flow())
    s = flow_sigmas(1000, 3.0)
    for t in (0, 400, 998):
        assert levels.sigma(t) == pytest.approx(float(s[t] / (1 - s[t])), rel=1e-9)
    assert levels.sigma(999) == math.inf


def test_zero_terminal_snr_has_infinite_sigma_at_the_end():
    scheduler = DDIMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True})
    assert NoiseLevels.from_scheduler(scheduler).sigma(999) == math.inf
    assert not GuidanceInterval(0.3, 5.0).contains(math.inf)


def test_interval_in_log_snr_is_the_same_interval():
    a = GuidanceInterval(0.28, 5.42)
    b = GuidanceInterval.from_log_snr(-2 * math.log(5.42), -2 * math.log(0.28))
    assert a.sigma_lo == pytest.approx(b.sigma_lo) and a.sigma_hi == pytest.approx(b.sigma_hi)
    assert as_interval([0.28, 5.42]) == a
    assert as_interval({"sigma_lo": 0.28, "sigma_hi": 5.42}) == a
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        GuidanceInterval(5.0, 1.0)


def count_unet_samples(pipe):
    """Number of samples the UNet is run on (a batched [uncond; cond] call counts 2 per image)."""
    counter = {"samples": 0, "calls": 0}

    def hook(module, args, kwargs):
        counter["samples"] += args[0].shape[0]
        counter["calls"] += 1

    return counter, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("steps", [4, 8])
def test_interval_skips_the_unconditional_pass(pipe, steps):
    interval = GuidanceInterval(0.5, 3.0)
    pipe.scheduler.set_timesteps(steps)
    levels = NoiseLevels.from_scheduler(pipe.scheduler)
    guided = sum(interval.contains(levels.sigma(t)) for t in pipe.scheduler.timesteps)
    assert 0 < guided < steps  # the interval really cuts somewhere at this step count
    counter, handle = count_unet_samples(pipe)
    try:
        out = pipe("a circle", guidance_interval=interval, seed=1, num_inference_steps=steps,
                   num_images_per_prompt=2, **SMALL)
    finally:
        handle.remove()
    assert counter["calls"] == steps  # one batched call per step
    assert counter["samples"] == 2 * (2 * guided + (steps - guided))
    assert out.unet_evaluations == 2 * guided + (steps - guided)
    full, handle = count_unet_samples(pipe)
    try:
        pipe("a circle", seed=1, num_inference_steps=steps, num_images_per_prompt=2, **SMALL)
    finally:
        handle.remove()
    assert full["samples"] - counter["samples"] == 2 * (steps - guided)


def test_interval_outside_every_step_equals_no_guidance(pipe):
    never = pipe("a circle", guidance_interval=(100.0, 200.0), seed=2, num_inference_steps=3, **SMALL)
    unguided = pipe("a circle", guidance_scale=1.0, seed=2, num_inference_steps=3, **SMALL)
    np.testing.assert_allclose(never.images, unguided.images, atol=1e-6)
    assert never.unet_evaluations == 3


def test_guidance_rescale_in_the_pipeline_matches_the_formula(pipe):
    """One step by hand (DDIM) equals the pipeline's first latent step with rescale."""
    captured = []
    pipe("a circle", guidance_rescale=0.7, seed=5, num_inference_steps=2,
         callback=lambda info: captured.append(info.latents.clone()), **SMALL)
    pipe.scheduler.set_timesteps(2)
    t = pipe.scheduler.timesteps[0]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    from ldm_pipeline.prompts import encode_pair

    e = encode_pair(pipe.text_encoder, pipe.tokenizer, ["a circle"], None, with_uncond=True)
    with torch.no_grad():
        u, c = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=e.pair()).sample.chunk(2)
    guided = u + 7.5 * (c - u)
    dims = (1, 2, 3)
    pred = 0.7 * guided * c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True) + 0.3 * guided
    expected = pipe.scheduler.step(pred, t, latents).prev_sample
    torch.testing.assert_close(captured[0], expected, atol=1e-5, rtol=1e-5)


def test_plan_uses_scale_one_outside_interval():
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    plan = GuidancePlan(Guidance(scale=5.0, interval=GuidanceInterval(0.5, 3.0)), scheduler)
    assert plan.scale_at(999) == 1.0 and not plan.needs_uncond(plan.scale_at(999))
    assert plan.scale_at(500) == 5.0
