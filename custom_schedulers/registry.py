"""Scheduler names -> a scheduler built from an existing diffusers scheduler config.

    from custom_schedulers import registry
    pipe.scheduler = registry.build("dpmpp-2m", pipe.scheduler.config, sigma_schedule="karras")

Our short names ("ddim", "dpmpp-2m", ...) and our class names build our samplers; diffusers'
stock scheduler class names ("DPMSolverMultistepScheduler", ...) build the stock scheduler; A1111 names
("DPM++ 2M Karras", "Euler a") and ComfyUI names (`build("dpmpp_2m", config, schedule="karras")`) build
what they name (see `names`).
Overrides are config fields of the built class, e.g. `timestep_spacing`, `eta`, `solver_order`,
`sigma_schedule` (ours) or `use_karras_sigmas` (stock and ours).
"""

from __future__ import annotations

from typing import Any, Mapping

import diffusers
from diffusers import SchedulerMixin

from . import names
from .base import _DIFFUSERS_SIGMA_FLAGS, DiffusionSampler
from .scheduling_adams import DEISSampler, IPNDMSampler
from .scheduling_ancestral import EulerAncestralSampler
from .scheduling_ddim import DDIMSampler
from .scheduling_ddpm import DDPMSampler
from .scheduling_dpmpp import DPMSolverPlusPlus3MSDESampler, DPMSolverPlusPlusSampler, DPMSolverPlusPlusSDESampler
from .scheduling_dpmpp_2s import DPMSolverPlusPlus2SAncestralSampler, DPMSolverPlusPlusSinglestepSDESampler
from .scheduling_er_sde import ERSDESampler
from .scheduling_euler import EulerSampler
from .scheduling_exponential import ExponentialHeunSampler, ResMultistepSampler
from .scheduling_heun import HeunSampler
from .scheduling_lcm import LCMSampler
from .scheduling_named import CosineScheduler, ZeroTerminalSNRScheduler
from .scheduling_rectified_flow import RectifiedFlowEulerSampler, RectifiedFlowHeunSampler, RectifiedFlowScheduler
from .scheduling_unipc import UniPCSampler

# short name -> (our class, the options that name implies)
OURS: dict[str, tuple[type[DiffusionSampler], dict[str, Any]]] = {
    "ddpm": (DDPMSampler, {}),
    "ddim": (DDIMSampler, {}),
    "dpmpp-2m": (DPMSolverPlusPlusSampler, {"solver_order": 2}),
    "dpmpp-3m": (DPMSolverPlusPlusSampler, {"solver_order": 3}),
    "dpmpp-2m-sde": (DPMSolverPlusPlusSDESampler, {"solver_order": 2}),
    "euler": (EulerSampler, {}),
    "heun": (HeunSampler, {}),
    "rf-euler": (RectifiedFlowEulerSampler, {}),
    "rf-heun": (RectifiedFlowHeunSampler, {}),
    "lcm": (LCMSampler, {}),
    "unipc": (UniPCSampler, {"solver_type": "bh2"}),
    "unipc-bh1": (UniPCSampler, {"solver_type": "bh1"}),
    "euler-a": (EulerAncestralSampler, {}),
    "dpmpp-2s-a": (DPMSolverPlusPlus2SAncestralSampler, {}),
    "dpmpp-sde": (DPMSolverPlusPlusSinglestepSDESampler, {}),
    "dpmpp-3m-sde": (DPMSolverPlusPlus3MSDESampler, {}),
    "ipndm": (IPNDMSampler, {"step_weights": "uniform"}),
    "ipndm-v": (IPNDMSampler, {"step_weights": "variable"}),
    "deis": (DEISSampler, {}),
    "res-multistep": (ResMultistepSampler, {}),
    "exp-heun-2-x0": (ExponentialHeunSampler, {}),
    "er-sde": (ERSDESampler, {}),
    # Our most accurate configuration on docs/sampler_accuracy.md: DPM++ 2M with the Adams-Moulton corrector,
    # log-SNR-uniform levels down to sigma/alpha = 0.1 (s = 0.1 for flow) and the extrapolated final step.
    "dpmpp-2m-pc": (DPMSolverPlusPlusSampler, {"solver_order": 2, "corrector": "adams-moulton",
                                               "sigma_schedule": "exponential", "sigma_min": 0.1,
                                               "final_step": "extrapolate"}),
}

# Our classes by class name (the named composites are built by class name only: they override the
# model's schedule, so they are not offered as samplers for an arbitrary model).
OUR_CLASSES: dict[str, type[DiffusionSampler]] = {
    cls.__name__: cls
    for cls in (
        DDPMSampler, DDIMSampler, DPMSolverPlusPlusSampler, DPMSolverPlusPlusSDESampler, EulerSampler, HeunSampler,
        RectifiedFlowEulerSampler, RectifiedFlowHeunSampler, LCMSampler, UniPCSampler,
        EulerAncestralSampler, DPMSolverPlusPlus2SAncestralSampler, DPMSolverPlusPlusSinglestepSDESampler,
        DPMSolverPlusPlus3MSDESampler, CosineScheduler, ZeroTerminalSNRScheduler, RectifiedFlowScheduler,
        IPNDMSampler, DEISSampler, ResMultistepSampler, ExponentialHeunSampler, ERSDESampler,
    )
}

STOCK = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "LCMScheduler",
    "TCDScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
)


def available() -> list[str]:
    """Every name `build` offers: our short names first, then diffusers' stock scheduler class names."""
    return list(OURS) + [name for name in STOCK if hasattr(diffusers, name)]


def is_ours(name: str) -> bool:
    """True for our short names and class names, False for diffusers' stock schedulers."""
    return name in OURS or name in OUR_CLASSES


def build(name: str, config: Mapping[str, Any], schedule: str | None = None, **overrides) -> SchedulerMixin:
    """Scheduler `name` built from an existing scheduler config (e.g. `pipe.scheduler.config`).

    The config carries the model's noise schedule and prediction type; `schedule` (an A1111 schedule
    type or ComfyUI scheduler name, "Karras", "sgm_uniform", ...) and `overrides` set sampler options
    (they win over both the config and the options a name implies).
    """
    config = dict(config)
    if not (is_ours(name) or name in STOCK):
        if names.resolve(name, schedule) is None:
            raise ValueError(f"Unknown scheduler {name!r}; available: {', '.join(available())}; "
                             f"or an A1111 / ComfyUI name: {', '.join(names.known())}.")
        name, schedule = names.resolve(name, schedule)
    overrides = {**names.schedule_overrides(schedule, stock=name in STOCK), **overrides}
    if name in OURS:
        cls, implied = OURS[name]
        check_options(name, cls, overrides)
        return cls.from_config(config, **{**implied, **overrides})
    if name in OUR_CLASSES:
        check_options(name, OUR_CLASSES[name], overrides)
        return OUR_CLASSES[name].from_config(config, **overrides)
    if name in STOCK and hasattr(diffusers, name):
        cls = getattr(diffusers, name)
        check_options(name, cls, overrides)
        return cls.from_config(config, **overrides)
    raise ValueError(f"Unknown scheduler {name!r}; available: {', '.join(available())}.")


def describe(class_name: str, config: Mapping[str, Any]) -> tuple[str, str]:
    """(A1111 sampler name, schedule type) of a scheduler class and its config, e.g. ("DPM++ 2M", "Karras")."""
    return names.a1111_names(short_name(class_name, config), config)


def short_name(class_name: str, config: Mapping[str, Any]) -> str:
    """The most specific short name whose class and implied options match, the level schedule aside (the
    schedule type names that); the class name where none does."""
    matches = [name for name, (cls, implied) in OURS.items()
               if cls.__name__ == class_name
               and all(config.get(k) == v for k, v in implied.items() if k != "sigma_schedule")]
    return max(matches, key=lambda name: len(OURS[name][1]), default=class_name)


def check_options(name: str, cls: type, overrides: Mapping[str, Any]) -> None:
    """Refuse an option the scheduler does not have (diffusers' `from_config` would drop it silently).

    Our samplers also take diffusers' sigma flags (`use_karras_sigmas`, ...), translated to `sigma_schedule`.
    Used by `build` and by `ldm_pipeline.scheduler_swap`: one check, one message."""
    accepted = cls._get_init_keys(cls) - {"self", "args", "kwargs"}
    if issubclass(cls, DiffusionSampler):
        accepted |= set(_DIFFUSERS_SIGMA_FLAGS) | {"use_beta_sigmas"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"Scheduler {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(accepted))}."
        )
