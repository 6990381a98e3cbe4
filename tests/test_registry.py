"""`custom_schedulers.registry`: names -> schedulers built from a model's scheduler config."""

from __future__ import annotations

import diffusers
import pytest

from custom_schedulers import (
    DDIMSampler,
    DPMSolverPlusPlusSampler,
    DPMSolverPlusPlusSDESampler,
    RectifiedFlowEulerSampler,
    ZeroTerminalSNRScheduler,
    registry,
)
from training.tiny_models import SD15_SCHEDULER_CONFIG

SHORT_NAMES = ["ddpm", "ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "euler", "heun", "rf-euler", "rf-heun", "lcm"]
STOCK = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "HeunDiscreteScheduler", "UniPCMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "DDPMScheduler",
         "FlowMatchEulerDiscreteScheduler", "LCMScheduler"]


def test_available_lists_ours_then_stock():
    names = registry.available()
    assert names[: len(SHORT_NAMES)] == SHORT_NAMES
    assert set(STOCK) <= set(names)
    assert all(registry.is_ours(n) for n in SHORT_NAMES) and not any(registry.is_ours(n) for n in STOCK)


@pytest.mark.parametrize("name", registry.available())
def test_every_name_builds_from_the_sd_config(name):
    scheduler = registry.build(name, SD15_SCHEDULER_CONFIG)
    assert isinstance(scheduler, diffusers.SchedulerMixin)
    assert scheduler.config.num_train_timesteps == 1000
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


@pytest.mark.parametrize(
    "name, cls, options",
    [("dpmpp-2m", DPMSolverPlusPlusSampler, {"solver_order": 2}), ("dpmpp-3m", DPMSolverPlusPlusSampler,
     {"solver_order": 3}), ("dpmpp-2m-sde", DPMSolverPlusPlusSDESampler, {"solver_order": 2}),
     ("ddim", DDIMSampler, {"eta": 0.0}), ("rf-euler", RectifiedFlowEulerSampler, {})],
)
def test_short_names_imply_their_options(name, cls, options):
    scheduler = registry.build(name, SD15_SCHEDULER_CONFIG)
    assert type(scheduler) is cls
    assert {k: scheduler.config[k] for k in options} == options


def test_overrides_win_over_config_and_name():
    scheduler = registry.build("dpmpp-3m", SD15_SCHEDULER_CONFIG, solver_order=1, timestep_spacing="leading",
                               use_karras_sigmas=True)
    assert scheduler.config.solver_order == 1 and scheduler.config.timestep_spacing == "leading"
    assert scheduler.config.sigma_schedule == "karras"
    ddim = registry.build("ddim", SD15_SCHEDULER_CONFIG, eta=0.5)
    assert ddim.config.eta == 0.5
    stock = registry.build("DPMSolverMultistepScheduler", SD15_SCHEDULER_CONFIG, use_karras_sigmas=True)
    assert stock.config.use_karras_sigmas is True


def test_our_class_names_build_too():
    scheduler = registry.build("ZeroTerminalSNRScheduler", SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")
    assert type(scheduler) is ZeroTerminalSNRScheduler and registry.is_ours("ZeroTerminalSNRScheduler")


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="Unknown scheduler 'dpm\\+\\+'.*available: ddpm, ddim, dpmpp-2m"):
        registry.build("dpm++", SD15_SCHEDULER_CONFIG)


def test_flow_match_config_builds_a_flow_sampler():
    flow_config = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    scheduler = registry.build("dpmpp-2m", flow_config)
    assert scheduler.config.beta_schedule == "flow" and scheduler.config.prediction_type == "flow"
    assert scheduler.config.shift == 3.0


def test_overrides_survive_keys_the_source_config_defaulted():
    """A config saved by a scheduler lists the keys it defaulted (`_use_default_values`); diffusers drops those
    from the config when loading, and an override of such a key must still win."""
    ours = registry.build("ddim", SD15_SCHEDULER_CONFIG)  # timestep_spacing defaulted
    assert "timestep_spacing" in ours.config["_use_default_values"]
    rebuilt = registry.build("dpmpp-2m", ours.config, timestep_spacing="leading", use_karras_sigmas=True)
    assert rebuilt.config.timestep_spacing == "leading" and rebuilt.config.sigma_schedule == "karras"
    assert registry.build("rf-euler", SD15_SCHEDULER_CONFIG, shift=2.0).config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("name", ["dpmpp-2m", "RectifiedFlowScheduler", "DPMSolverMultistepScheduler"])
def test_unknown_override_is_refused_not_dropped(name):
    with pytest.raises(ValueError, match="has no option 'solver_ordr'.*options are:.*"):
        registry.build(name, SD15_SCHEDULER_CONFIG, solver_ordr=3)


def test_diffusers_sigma_flag_is_accepted_by_ours():
    assert registry.build("dpmpp-2m", SD15_SCHEDULER_CONFIG, use_karras_sigmas=True).config.sigma_schedule == "karras"
