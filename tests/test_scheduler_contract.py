"""The scheduler contract every sampler of ours keeps (one parametrized test per property, no per-class branches)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from scheduler_helpers import sample_loop

from custom_schedulers import DDIMSampler, registry

SAMPLERS = list(registry.OURS)

# The scheduler configs shipped with popular checkpoints, written out (no download).
SD15 = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}
SD21_V = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
MODEL_CONFIGS = {"sd15": SD15, "sd21-v": SD21_V, "sdxl": SDXL}


def _x(seed=0, shape=(2, 4, 8, 8), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", SAMPLERS)
def test_required_attributes_and_shapes(name):
    scheduler = registry.build(name, SD15)
    assert isinstance(scheduler, diffusers.SchedulerMixin) and isinstance(scheduler, diffusers.ConfigMixin)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order in (1, 2)
    scheduler.set_timesteps(5)
    x = _x()
    assert torch.equal(scheduler.scale_model_input(x, scheduler.timesteps[0]), x)
    out = scheduler.step(torch.tanh(x), scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == x.shape and out.pred_original_sample.shape == x.shape
    assert out.prev_sample.dtype == x.dtype
    as_tuple = scheduler.step(torch.tanh(x), scheduler.timesteps[1], out.prev_sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_keeps_the_sample_dtype(name, dtype):
    scheduler = registry.build(name, SD15)
    scheduler.set_timesteps(4)
    _, final = sample_loop(scheduler, _x(dtype=dtype), model=lambda x, t: 0.5 * x)
    assert final.dtype == dtype and torch.isfinite(final).all()


@pytest.mark.parametrize("name", SAMPLERS)
def test_save_pretrained_round_trip(name, tmp_path):
    scheduler = registry.build(name, SD21_V, timestep_spacing="linspace", sigma_schedule="karras")
    scheduler.save_pretrained(tmp_path)
    loaded = type(scheduler).from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    for s in (scheduler, loaded):
        s.set_timesteps(6)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps)
    torch.testing.assert_close(sample_loop(loaded, _x())[1], sample_loop(scheduler, _x())[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("model", list(MODEL_CONFIGS))
def test_from_config_of_model_scheduler_configs(name, model):
    source = MODEL_CONFIGS[model]
    scheduler = registry.build(name, source)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset"):
        assert scheduler.config[key] == source[key]
    assert scheduler.config.prediction_type == source.get("prediction_type", "epsilon")
    assert scheduler.config.timestep_spacing == source.get("timestep_spacing", "trailing")
    # ...and back into a stock scheduler: the model's settings survive.
    stock = diffusers.DDIMScheduler.from_config(scheduler.config)
    assert stock.config.prediction_type == scheduler.config.prediction_type
    assert stock.config.steps_offset == source["steps_offset"]
    scheduler.set_timesteps(4)
    assert torch.isfinite(sample_loop(scheduler, _x())[1]).all()


def test_diffusers_karras_flag_maps_to_sigma_schedule():
    scheduler = registry.build("dpmpp-2m", dict(SDXL, use_karras_sigmas=True))
    assert scheduler.config.sigma_schedule == "karras"
    with pytest.raises(ValueError, match="sigma_schedule"):
        registry.build("dpmpp-2m", dict(SDXL, use_beta_sigmas=True))


@pytest.mark.parametrize("name", SAMPLERS)
def test_custom_timesteps(name):
    scheduler = registry.build(name, SD15)
    scheduler.set_timesteps(timesteps=[999, 640, 300, 51])
    assert scheduler.timesteps[:: scheduler.order].tolist() == [999, 640, 300, 51]  # every step's first evaluation
    assert scheduler.num_inference_steps == 4
    assert torch.isfinite(sample_loop(scheduler, _x())[1]).all()


@pytest.mark.parametrize("name", SAMPLERS)
def test_custom_sigmas(name):
    scheduler = registry.build(name, SD15)
    scheduler.set_timesteps(sigmas=[14.0, 3.0, 0.7, 0.1, 0.0])
    alpha, sigma = scheduler.noise_level_at(0)
    assert sigma / alpha == pytest.approx(14.0)
    assert scheduler.num_inference_steps == 4
    assert torch.isfinite(sample_loop(scheduler, _x())[1]).all()


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_and_velocity_at_training_timesteps(name):
    scheduler = registry.build(name, SD21_V)
    x0, eps = _x(1), _x(2)
    t = torch.tensor([0, 500])
    abar = scheduler.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(scheduler.add_noise(x0, eps, t), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    torch.testing.assert_close(scheduler.get_velocity(x0, eps, t), abar.sqrt() * eps - (1 - abar).sqrt() * x0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_begin_index(name):
    scheduler = registry.build(name, SD15)
    scheduler.set_timesteps(8)
    begin = 3 * scheduler.order  # what diffusers' img2img pipelines do for strength 5/8
    start = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    x = scheduler.add_noise(_x(1), _x(2), start[:1])
    for t in start:
        x = scheduler.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps, message", [(0, "positive integer"), (1001, "cannot exceed num_train_timesteps")])
def test_bad_step_counts(name, steps, message):
    with pytest.raises(ValueError, match=message):
        registry.build(name, SD15).set_timesteps(steps)


@pytest.mark.parametrize("name", SAMPLERS)
def test_unknown_prediction_type_names_valid_values(name):
    with pytest.raises(ValueError, match="valid values: epsilon, v_prediction, sample, flow"):
        registry.build(name, SD15, prediction_type="x0")


@pytest.mark.parametrize("field, value", [("timestep_spacing", "uniform"), ("sigma_schedule", "polyexponential")])
def test_unknown_choice_names_valid_values(field, value):
    with pytest.raises(ValueError, match=f"Unknown {field}.*valid values"):
        DDIMSampler.from_config(SD15, **{field: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timesteps": [10, 500]}, "strictly decreasing"),
        ({"timesteps": [1000, 10]}, r"must lie in \[0, 999\]"),
        ({"sigmas": [5.0, 7.0]}, "strictly decreasing"),
        ({"timesteps": [999, 10], "sigmas": [5.0, 1.0]}, "not both"),
    ],
)
def test_bad_custom_grids(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDIMSampler.from_config(SD15).set_timesteps(**kwargs)


def test_step_before_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMSampler.from_config(SD15).step(_x(), 999, _x())


@pytest.mark.parametrize("name", SAMPLERS)
def test_epsilon_at_zero_terminal_snr_is_refused_with_the_fix(name):
    scheduler = registry.build(name, SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="v_prediction"):
        scheduler.set_timesteps(10)
    scheduler.set_timesteps(10, timesteps=list(range(990, 0, -110)))  # starting below T-1 is fine


# ---------------------------------------------------------------- the previous timestep comes from the grid


def test_ddim_previous_timestep_comes_from_the_grid():
    """With "linspace" and 7 steps the grid is not a fixed stride (diffusers' DDIM steps to t - T/N instead,
    diffusers issue #12633). A zero x_0 prediction makes DDIM's step exactly x * sigma_next / sigma."""
    scheduler = DDIMSampler.from_config(SD15, timestep_spacing="linspace", prediction_type="sample")
    scheduler.set_timesteps(7)
    t = scheduler.timesteps
    sigma = (1 - scheduler.schedule.alphas_cumprod).sqrt()
    x = _x()
    for i in range(len(t) - 1):
        x_next = scheduler.step(torch.zeros_like(x), t[i], x).prev_sample
        torch.testing.assert_close(x_next, x * float(sigma[t[i + 1]] / sigma[t[i]]))
        x = x_next


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("dpmpp-2m", {"final_step": "last"}, "Unknown final_step 'last'; valid values: denoise, extrapolate"),
        ("dpmpp-2m", {"corrector": "unipc"}, "Unknown corrector 'unipc'; valid values: none, adams-moulton"),
        ("dpmpp-3m", {"solver_order": 4}, "solver_order must be 1, 2 or 3"),
        ("ddim", {"eta": 1.5}, r"eta must be in \[0, 1\]"),
        ("dpmpp-2m", {"sigma_schedule": "karras", "sigma_min": -1.0}, "sigma_min must be a positive"),
    ],
)
def test_bad_sampler_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        registry.build(name, SD15, **options)
