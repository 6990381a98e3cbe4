"""swap_scheduler: keeps the model's keys, takes the sampler's, refuses incompatible swaps with a reason."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from ldm_pipeline import LatentTextToImagePipeline, SchedulerSwapError, swap_scheduler
from ldm_pipeline.scheduler_swap import available_schedulers
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components

ZTSNR_V = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
           "timestep_spacing": "leading"}
SMALL = {"width": 32, "height": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "np", "seed": 1}


def ours(scheduler_config=SD15_SCHEDULER_CONFIG):
    c = tiny_sd_components(scheduler=DDIMScheduler.from_config(scheduler_config))
    return LatentTextToImagePipeline(**{k: c[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})


def test_swap_on_stock_pipeline_equals_from_config_when_nothing_is_lost():
    c = tiny_sd_components()
    stock = StableDiffusionPipeline(**c, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    old_config = stock.scheduler.config
    report = swap_scheduler(stock, "EulerDiscreteScheduler")
    assert isinstance(stock.scheduler, EulerDiscreteScheduler) and report.new_class == "EulerDiscreteScheduler"
    kwargs = dict(num_inference_steps=2, width=32, height=32, output_type="np")
    a = stock("a circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    stock.scheduler = EulerDiscreteScheduler.from_config(old_config)
    b = stock("a circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(a - b).max() < 1e-6


def test_keeps_v_prediction_and_zero_terminal_snr_where_from_config_would_not():
    pipe = ours(ZTSNR_V)
    # what diffusers does silently: PNDM has no rescale_betas_zero_snr and drops it
    from diffusers import PNDMScheduler

    assert not PNDMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[-1] == 0
    with pytest.raises(SchedulerSwapError, match="PNDMScheduler has no `rescale_betas_zero_snr` option"):
        swap_scheduler(pipe, "PNDMScheduler")
    assert isinstance(pipe.scheduler, DDIMScheduler)  # unchanged after a refusal
    report = swap_scheduler(pipe, "EulerDiscreteScheduler")
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr is True
    assert config.timestep_spacing == "trailing" and report.changed["timestep_spacing"] == ("leading", "trailing")
    assert any("zero-terminal-SNR" in note and "0.7" in note for note in report.notes)
    assert pipe("a circle", **SMALL).recipes[0]["guidance"]["rescale"] == 0.7  # the pipeline's default


def test_user_sampler_options_win_and_are_reported():
    pipe = ours()
    report = swap_scheduler(pipe, "DPMSolverMultistepScheduler", use_karras_sigmas=True, timestep_spacing="trailing")
    assert pipe.scheduler.config.use_karras_sigmas is True
    assert report.changed["timestep_spacing"] == ("leading", "trailing")
    assert "use_karras_sigmas" in report.changed and "kept prediction_type = 'epsilon'" in str(report)


def test_model_keys_cannot_be_overridden():
    pipe = ours()
    with pytest.raises(SchedulerSwapError, match=r"prediction_type='v_prediction' \(model: 'epsilon'\).*belong to the model"):
        swap_scheduler(pipe, "EulerDiscreteScheduler", prediction_type="v_prediction")


def test_epsilon_at_zero_terminal_snr_is_refused():
    pipe = ours({**SD15_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True})
    with pytest.raises(SchedulerSwapError, match="epsilon prediction at zero terminal SNR is singular"):
        swap_scheduler(pipe, "EulerDiscreteScheduler")


def test_flow_sampler_cannot_take_a_vp_model():
    pipe = ours()
    with pytest.raises(SchedulerSwapError, match="FlowMatchEulerDiscreteScheduler has no `prediction_type`"):
        swap_scheduler(pipe, "FlowMatchEulerDiscreteScheduler")


def test_unknown_name_lists_the_choices():
    with pytest.raises(SchedulerSwapError, match="Unknown scheduler 'warp-drive'. Available: .*DDIMScheduler"):
        swap_scheduler(ours(), "warp-drive")


@pytest.mark.parametrize("name", [n for n in available_schedulers() if not n.startswith("FlowMatch")])
def test_every_offered_vp_scheduler_swaps_in_and_generates(name):
    pipe = ours()
    try:
        report = swap_scheduler(pipe, name)
    except SchedulerSwapError as error:
        pytest.fail(f"{name} refused an SD-1.5 epsilon model: {error}")
    assert report.kept["prediction_type"] == "epsilon"
    out = pipe("a circle", **{**SMALL, "num_inference_steps": 4})
    assert out.images.shape == (1, 32, 32, 3) and abs(out.images).sum() > 0


def test_loading_a_zero_terminal_snr_model_switches_to_trailing_spacing(tmp_path):
    c = tiny_sd_components(scheduler=DDIMScheduler.from_config(ZTSNR_V))
    StableDiffusionPipeline(**c, requires_safety_checker=False).save_pretrained(str(tmp_path))
    from ldm_pipeline import load_pipeline

    pipe = load_pipeline(tmp_path, device="cpu")
    config = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler) and config.timestep_spacing == "trailing"
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr is True
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == 999


def test_swaps_chain_between_ours_and_stock():
    pipe = ours()
    for name in ("euler", "EulerDiscreteScheduler", "dpmpp-2m", "DDIMScheduler"):
        swap_scheduler(pipe, name)  # our samplers record shift=1.0, which a stock VP class may lack
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_swap_refuses_an_option_the_sampler_lacks_and_translates_karras_flag():
    pipe = StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False)
    with pytest.raises(SchedulerSwapError, match="no option 'eta'"):
        swap_scheduler(pipe, "dpmpp-2m", eta=0.5)
    swap_scheduler(pipe, "dpmpp-2m", use_karras_sigmas=True)
    assert pipe.scheduler.config.sigma_schedule == "karras"


@pytest.mark.parametrize("overrides", [{"sigma_schedule": "karras"}, {"use_karras_sigmas": True},
                                       {"final_step": "denoise", "sigma_min": None}])
def test_a_presets_options_yield_to_overrides_as_in_registry_build(overrides):
    """dpmpp-2m-pc implies exponential sigmas: an override wins in swap_scheduler exactly as in registry.build."""
    from custom_schedulers import registry

    pipe = ours()
    base = dict(pipe.scheduler.config)
    report = swap_scheduler(pipe, "dpmpp-2m-pc", **overrides)
    built = registry.build("dpmpp-2m-pc", base, **overrides)
    for key in ("sigma_schedule", "final_step", "sigma_min", "corrector", "solver_order"):
        assert pipe.scheduler.config[key] == built.config[key], key
    if "sigma_schedule" in overrides or "use_karras_sigmas" in overrides:
        assert pipe.scheduler.config["sigma_schedule"] == "karras"
        assert report.changed.get("sigma_schedule", (None, None))[1] == "karras"
