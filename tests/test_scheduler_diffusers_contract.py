"""diffusers' `SchedulerCommonTest` (tests/schedulers/test_schedulers.py), its ten checks written out for every
class of ours (diffusers' test files are not in its PyPI distribution), plus the stock behaviour users rely on:
DDIM's `eta` step argument, img2img's timestep slicing, saving a stock pipeline that holds one of ours."""

from __future__ import annotations

import inspect
import warnings

import diffusers
import numpy as np
import pytest
import torch
from scheduler_helpers import BASE_CONFIG, sample_loop, seeded, toy_model

from custom_schedulers import registry

CLASSES = list(registry.OUR_CLASSES.values())
IDS = list(registry.OUR_CLASSES)
STEPS = 10


def _sample(seed=0):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _first_step(scheduler, timestep_index=0, **kwargs):
    scheduler.set_timesteps(STEPS)
    sample = _sample()
    t = scheduler.timesteps[timestep_index]
    return scheduler.step(0.1 * sample, t, sample, generator=torch.manual_seed(0), **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_from_save_pretrained(cls, tmp_path):
    """save_config -> from_pretrained gives a scheduler whose step output is identical."""
    scheduler = cls(**BASE_CONFIG)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert torch.equal(_first_step(scheduler).prev_sample, _first_step(loaded).prev_sample)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_compatibles(cls):
    """Every compatible stock class builds from our config, and ours back from theirs gives our config again."""
    scheduler = cls(**BASE_CONFIG)
    assert scheduler.compatibles and all(c is not None for c in scheduler.compatibles)
    init_keys = cls._get_init_keys(cls)
    for stock in scheduler.compatibles:
        back = cls.from_config(stock.from_config(scheduler.config).config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config), stock
        assert not {k for k in back.config if k not in scheduler.config} & init_keys


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_from_pretrained(cls, tmp_path):
    """save_pretrained -> from_pretrained gives the same config (less `_use_default_values`)."""
    scheduler = cls(**BASE_CONFIG)
    scheduler.save_pretrained(tmp_path)
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == cls.from_pretrained(tmp_path).config


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_step_shape(cls):
    """Two consecutive steps return samples of the input's shape."""
    scheduler = cls(**BASE_CONFIG)
    out_0 = _first_step(scheduler).prev_sample
    out_1 = scheduler.step(0.1 * out_0, scheduler.timesteps[1], out_0, generator=torch.manual_seed(0)).prev_sample
    assert out_0.shape == _sample().shape == out_1.shape


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_scheduler_outputs_equivalence(cls):
    """return_dict=False gives the dataclass's fields, in order, equal."""
    as_dict = _first_step(cls(**BASE_CONFIG))
    as_tuple = _first_step(cls(**BASE_CONFIG), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict)
    for from_tuple, from_dict in zip(as_tuple, as_dict.values()):
        torch.testing.assert_close(from_tuple, from_dict, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_scheduler_public_api(cls):
    """init_noise_sigma, scale_model_input (shape-preserving at any timestep) and step exist."""
    scheduler = cls(**BASE_CONFIG)
    assert hasattr(scheduler, "init_noise_sigma") and callable(scheduler.step)
    assert scheduler.scale_model_input(_sample(), 0.0).shape == _sample().shape


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_add_noise_device(cls):
    """add_noise at a grid timestep (a 1-element tensor) works on the sample's device and keeps its shape."""
    scheduler = cls(**BASE_CONFIG)
    scheduler.set_timesteps(STEPS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sample = scheduler.scale_model_input(_sample().to(device), 0.0)
    noised = scheduler.add_noise(sample, torch.randn(sample.shape).to(device), scheduler.timesteps[5][None])
    assert noised.shape == sample.shape and noised.device == sample.device


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_deprecated_kwargs(cls):
    """`**kwargs` in __init__ only together with a non-empty `_deprecated_kwargs` list, and vice versa."""
    has_kwargs = "kwargs" in inspect.signature(cls.__init__).parameters
    assert has_kwargs == (len(cls._deprecated_kwargs) > 0)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_trained_betas(cls, tmp_path):
    """trained_betas (a numpy array) survive save_pretrained -> from_pretrained as `betas`."""
    scheduler = cls(**BASE_CONFIG, trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    assert scheduler.betas.tolist() == cls.from_pretrained(tmp_path).betas.tolist()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_getattr_is_correct(cls, caplog):
    """Attributes read silently; a config key read as an attribute warns (FutureWarning); unknown ones raise."""
    scheduler = cls(**BASE_CONFIG)
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.dummy_attribute == 5 and getattr(scheduler, "save_pretrained") == scheduler.save_pretrained  # noqa: B009
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match=f"'{cls.__name__}' object has no attribute 'does_not_exist'"):
        _ = scheduler.does_not_exist


# ---------------------------------------------------------------- stock attributes


def test_stock_attributes_match_stock_schedulers():
    """betas, alphas, alphas_cumprod and (Euler/DPM) sigmas mean what they mean in diffusers."""
    ours = registry.build("dpmpp-2m", dict(BASE_CONFIG, timestep_spacing="leading", steps_offset=1))
    stock = diffusers.EulerDiscreteScheduler.from_config(dict(BASE_CONFIG, timestep_spacing="leading", steps_offset=1))
    for name in ("betas", "alphas", "alphas_cumprod", "sigmas"):
        torch.testing.assert_close(getattr(ours, name), getattr(stock, name), rtol=1e-5, atol=1e-7)
    ours.set_timesteps(8)
    stock.set_timesteps(8)
    torch.testing.assert_close(ours.sigmas, stock.sigmas, rtol=1e-5, atol=1e-6)
    heun, stock_heun = registry.build("heun", BASE_CONFIG), diffusers.HeunDiscreteScheduler.from_config(
        dict(BASE_CONFIG, timestep_spacing="trailing"))
    heun.set_timesteps(6)
    stock_heun.set_timesteps(6)
    torch.testing.assert_close(heun.sigmas, stock_heun.sigmas, rtol=1e-5, atol=1e-6)
    assert float(registry.build("ddim", BASE_CONFIG).final_alpha_cumprod) == 1.0


# ---------------------------------------------------------------- DDIM eta as a step argument


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_eta_matches_stock_ddim(eta):
    """`step(..., eta=...)` as diffusers' DDIM takes it (StableDiffusionPipeline passes its `eta` there)."""
    config = dict(BASE_CONFIG, timestep_spacing="leading", steps_offset=1)
    theirs = diffusers.DDIMScheduler.from_config(config, set_alpha_to_one=True)
    ours = registry.build("ddim", config)  # config eta 0: the step argument wins
    for s in (theirs, ours):
        s.set_timesteps(8)
    their_final = sample_loop(theirs, _sample(), step_kwargs=seeded(eta=eta))[1]
    our_final = sample_loop(ours, _sample(), step_kwargs=seeded(eta=eta))[1]
    torch.testing.assert_close(our_final, their_final, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eta must be in"):
        ours.step(_sample(), ours.timesteps[0], _sample(), eta=2.0)


# ---------------------------------------------------------------- img2img: timesteps[t_start * order:]


def _img2img_timesteps(scheduler, num_steps: int, strength: float) -> torch.Tensor:
    """What diffusers' StableDiffusionImg2ImgPipeline.get_timesteps runs."""
    scheduler.set_timesteps(num_steps)
    t_start = int(max(num_steps - min(int(num_steps * strength), num_steps), 0))
    scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


ZTSNR_V = dict(BASE_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
HEUN_CASES = {  # the three cases that failed: a corrector without its predictor, an empty slice, one step at t = 0
    "zero-terminal-snr-0.5": (ZTSNR_V, {}, 10, 0.5),
    "zero-terminal-snr-0.75": (ZTSNR_V, {}, 10, 0.75),
    "leading-0.25": (dict(BASE_CONFIG, timestep_spacing="leading", steps_offset=1), {}, 4, 0.25),
    "karras-3-steps-0.67": (BASE_CONFIG, {"sigma_schedule": "karras"}, 3, 0.67),
}


@pytest.mark.parametrize("case", list(HEUN_CASES))
def test_heun_img2img_runs_the_stock_steps(case):
    config, options, num_steps, strength = HEUN_CASES[case]
    stock_options = {"use_karras_sigmas": True} if options else {}
    stock = diffusers.HeunDiscreteScheduler.from_config(dict(config, **stock_options))
    ours = registry.build("heun", config, **options)
    their_t, our_t = _img2img_timesteps(stock, num_steps, strength), _img2img_timesteps(ours, num_steps, strength)
    assert len(our_t) == len(their_t) > 0
    if not config.get("rescale_betas_zero_snr"):  # diffusers' Heun cannot rescale to zero terminal SNR
        torch.testing.assert_close(our_t.double(), their_t.double(), rtol=1e-4, atol=1e-3)
    x = _sample()
    for t in our_t:
        x = ours.step(toy_model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", list(registry.OURS))
@pytest.mark.parametrize("config", [BASE_CONFIG, dict(BASE_CONFIG, timestep_spacing="leading", steps_offset=1), ZTSNR_V],
                         ids=["trailing", "leading", "zero-terminal-snr"])
@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75, 1.0])
def test_img2img_slice_runs_the_last_steps(name, config, strength):
    """Every sampler, spacing and strength: the slice starts exactly the last int(N * strength) steps (every stock
    scheduler's `timesteps[t_start * order:]`; a step's first evaluation is every `order`-th entry), and they run."""
    scheduler = registry.build(name, config)
    num_steps = 8
    sliced = _img2img_timesteps(scheduler, num_steps, strength)
    step_starts = scheduler.timesteps[:: scheduler.order]
    assert len(step_starts) == num_steps
    torch.testing.assert_close(sliced[:: scheduler.order], step_starts[num_steps - int(num_steps * strength):])
    x = _sample()
    for t in sliced:
        x = scheduler.step(toy_model(x, t), t, x, generator=torch.manual_seed(0)).prev_sample
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------- a stock pipeline holding one of ours


def test_stock_pipeline_saves_and_loads_our_scheduler(tmp_path):
    from training.tiny_models import tiny_sd_components

    pipe = diffusers.StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False)
    pipe.scheduler = registry.build("dpmpp-2m", pipe.scheduler.config, sigma_schedule="karras")
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)  # `custom_schedulers` is imported
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert dict(loaded.scheduler.config) == {k: v for k, v in pipe.scheduler.config.items()
                                             if k != "_use_default_values"}
    stock = diffusers.DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
    assert stock.config.use_karras_sigmas is True  # not silently back to uniform levels


def test_stock_pipeline_eta_reaches_our_ddim():
    """StableDiffusionPipeline(..., eta=1.0) passes eta to `step`: our DDIM gives stock DDIM's image."""
    from training.tiny_models import tiny_sd_components

    components = tiny_sd_components()
    config, spacing = components["scheduler"].config, {"timestep_spacing": "leading", "steps_offset": 1}
    images = {}
    for label, scheduler in [("stock", diffusers.DDIMScheduler.from_config(config, set_alpha_to_one=True, **spacing)),
                             ("ours", registry.build("ddim", config, **spacing))]:
        pipe = diffusers.StableDiffusionPipeline(**dict(components, scheduler=scheduler), requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for eta in (0.0, 1.0):
            images[label, eta] = pipe("a red circle", num_inference_steps=4, eta=eta, output_type="np",
                                      generator=torch.Generator().manual_seed(0), height=32, width=32).images
    np.testing.assert_allclose(images["ours", 1.0], images["stock", 1.0], atol=1e-5)
    np.testing.assert_allclose(images["ours", 0.0], images["stock", 0.0], atol=1e-5)
    assert np.abs(images["ours", 1.0] - images["ours", 0.0]).max() > 1e-3  # eta is not silently ignored
