"""A1111 and ComfyUI names <-> our registry: every name builds, and what we write reads back to the same sampler."""

from __future__ import annotations

import diffusers
import pytest
from scheduler_helpers import BASE_CONFIG

from custom_schedulers import names, registry

SD = dict(BASE_CONFIG, timestep_spacing="leading", steps_offset=1)


@pytest.mark.parametrize("name", list(registry.OURS))
@pytest.mark.parametrize("schedule", [None, "Karras", "Exponential", "Uniform", "SGM Uniform", "DDIM", "Simple",
                                      "Beta", "KL Optimal", "Align Your Steps", "Normal"])
def test_what_we_write_builds_the_same_sampler(name, schedule):
    """class + config -> (A1111 sampler, schedule type) -> registry.build gives the same class and config."""
    scheduler = registry.build(name, SD, schedule=schedule)
    sampler, schedule_type = registry.describe(type(scheduler).__name__, scheduler.config)
    again = registry.build(sampler, SD, schedule=schedule_type)
    assert type(again) is type(scheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(again.config) == public(scheduler.config)


@pytest.mark.parametrize("text, cls, fields", [
    ("DPM++ 2M Karras", "DPMSolverPlusPlusSampler", {"solver_order": 2, "sigma_schedule": "karras"}),
    ("DPM++ 2M SDE Exponential", "DPMSolverPlusPlusSDESampler", {"sigma_schedule": "exponential"}),
    ("Euler a", "EulerAncestralSampler", {"eta": 1.0}),
    ("DDIM", "DDIMSampler", {"sigma_schedule": "default"}),
    ("UniPC", "UniPCSampler", {"solver_type": "bh2"}),
    ("UniPC bh1 Karras", "UniPCSampler", {"solver_type": "bh1", "sigma_schedule": "karras"}),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}),
    ("DEIS", "DEISSampler", {}),  # ComfyUI's / Forge's DEIS (tAB); diffusers' DEISMultistepScheduler by class name
    ("iPNDM v Karras", "IPNDMSampler", {"step_weights": "variable", "sigma_schedule": "karras"}),
])
def test_a1111_names_build(text, cls, fields):
    scheduler = registry.build(text, SD)
    assert type(scheduler).__name__ == cls
    assert {k: scheduler.config[k] for k in fields} == fields


@pytest.mark.parametrize("sampler, scheduler_name, cls, fields", [
    ("dpmpp_2m", "karras", "DPMSolverPlusPlusSampler", {"sigma_schedule": "karras"}),
    ("euler", "sgm_uniform", "EulerSampler", {"sigma_schedule": "sgm-uniform"}),
    ("euler", "beta", "EulerSampler", {"sigma_schedule": "beta"}),
    ("ddim", "ddim_uniform", "DDIMSampler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("dpmpp_sde", "karras", "DPMSolverPlusPlusSinglestepSDESampler", {"sigma_schedule": "karras"}),
    ("dpmpp_2s_ancestral", "exponential", "DPMSolverPlusPlus2SAncestralSampler", {"sigma_schedule": "exponential"}),
    ("euler_ancestral", "normal", "EulerAncestralSampler", {"sigma_schedule": "normal"}),
    ("ipndm", "karras", "IPNDMSampler", {"step_weights": "uniform"}),
    ("ipndm_v", "exponential", "IPNDMSampler", {"step_weights": "variable", "sigma_schedule": "exponential"}),
    ("deis", "beta", "DEISSampler", {"max_order": 3, "sigma_schedule": "beta"}),
    ("res_multistep", "simple", "ResMultistepSampler", {"sigma_schedule": "simple"}),
    ("exp_heun_2_x0", "kl_optimal", "ExponentialHeunSampler", {"sigma_schedule": "kl-optimal"}),
    ("er_sde", "sgm_uniform", "ERSDESampler", {"noise_scale": "er-sde", "max_stage": 3}),
])
def test_comfyui_names_build(sampler, scheduler_name, cls, fields):
    scheduler = registry.build(sampler, SD, schedule=scheduler_name)
    assert type(scheduler).__name__ == cls
    assert {k: scheduler.config[k] for k in fields} == fields


def test_stock_classes_are_described_with_a1111_names():
    karras = diffusers.DPMSolverMultistepScheduler.from_config(SD, use_karras_sigmas=True)
    assert registry.describe("DPMSolverMultistepScheduler", karras.config) == ("DPM++ 2M", "Karras")
    assert registry.describe("EulerAncestralDiscreteScheduler", SD) == ("Euler a", "DDIM")
    pc = registry.build("dpmpp-2m-pc", SD)
    assert registry.describe(type(pc).__name__, pc.config) == ("DPM++ 2M PC", "Exponential")


def test_unknown_names_say_what_is_known():
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M"):
        registry.build("DPM++ 9M", SD)
    with pytest.raises(ValueError, match="karras"):
        registry.build("dpmpp_2m", SD, schedule="polyexponential")
    with pytest.raises(ValueError, match="no 'linear' schedule"):
        names.schedule_overrides("linear", stock=True)
