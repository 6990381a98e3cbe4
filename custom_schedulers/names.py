"""The names people know: AUTOMATIC1111 and ComfyUI sampler and schedule names <-> our registry.

    names.a1111_names("dpmpp-2m", config)                 # -> ("DPM++ 2M", "Karras")
    names.resolve("DPM++ 2M Karras")                      # -> ("dpmpp-2m", "Karras")
    names.resolve("dpmpp_2m", "karras")                   # ComfyUI's sampler + scheduler: ("dpmpp-2m", "karras")
    names.schedule_overrides("Karras")                    # -> {"sigma_schedule": "karras"}

A1111 (1.9+) writes `Sampler: DPM++ 2M, Schedule type: Karras` in its infotext; older versions wrote
`Sampler: DPM++ 2M Karras`. Both parse. Where A1111 has no name for one of our samplers, it gets a
clear name of its own ("DPM++ 3M", "DPM++ 2M PC", "RF Euler", ...); where no sampler of ours implements
an A1111/ComfyUI sampler, the name resolves to the diffusers class that does.

Schedule types: A1111's "Karras", "Exponential", "KL Optimal", "Beta", "SGM Uniform", "Simple", "Normal" and
"Align Your Steps" are our `sigma_schedule`s of those names (ComfyUI: karras, exponential, kl_optimal, beta,
sgm_uniform, simple, normal); "Uniform" (timesteps evenly spaced over the whole range) is our "linspace"
spacing, "DDIM" (ComfyUI "ddim_uniform", stride T/N from t = 1) our "leading" with steps_offset 1, and our
default "trailing" spacing writes "Trailing" (A1111 has no name for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# registry short name (or diffusers class) -> A1111 sampler name; ours first, then the stock classes.
A1111_SAMPLERS = {
    "ddim": "DDIM", "ddpm": "DDPM", "dpmpp-2m": "DPM++ 2M", "dpmpp-3m": "DPM++ 3M", "dpmpp-2m-sde": "DPM++ 2M SDE",
    "euler": "Euler", "heun": "Heun", "lcm": "LCM", "rf-euler": "RF Euler", "rf-heun": "RF Heun",
    "dpmpp-2m-pc": "DPM++ 2M PC", "unipc": "UniPC", "unipc-bh1": "UniPC bh1",
    "euler-a": "Euler a", "dpmpp-2s-a": "DPM++ 2S a", "dpmpp-sde": "DPM++ SDE",
    "dpmpp-3m-sde": "DPM++ 3M SDE", "ipndm": "iPNDM", "ipndm-v": "iPNDM v", "deis": "DEIS",
    "res-multistep": "Res Multistep", "exp-heun-2-x0": "Exp Heun 2 x0", "er-sde": "ER SDE",
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "DPMSolverSinglestepScheduler": "DPM++ 2S",
    "DPMSolverSDEScheduler": "DPM++ SDE", "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "UniPCMultistepScheduler": "UniPC", "DEISMultistepScheduler": "DEIS", "DDPMScheduler": "DDPM", "LCMScheduler": "LCM",
}

# ComfyUI sampler name -> registry name (ours where we have it).
COMFYUI_SAMPLERS = {
    "ddim": "ddim", "ddpm": "ddpm", "dpmpp_2m": "dpmpp-2m", "dpmpp_2m_sde": "dpmpp-2m-sde", "euler": "euler",
    "heun": "heun", "lcm": "lcm", "euler_ancestral": "euler-a", "lms": "LMSDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_ancestral": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_sde": "dpmpp-sde", "dpmpp_2s_ancestral": "dpmpp-2s-a",
    "dpmpp_3m_sde": "dpmpp-3m-sde", "uni_pc": "unipc-bh1", "uni_pc_bh2": "unipc", "deis": "deis",
    "ipndm": "ipndm", "ipndm_v": "ipndm-v", "res_multistep": "res-multistep", "exp_heun_2_x0": "exp-heun-2-x0",
    "er_sde": "er-sde",
}

# schedule (A1111 schedule type or ComfyUI scheduler name, lower case) -> our config fields
SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": {"sigma_schedule": "karras"},
    "exponential": {"sigma_schedule": "exponential"},
    "linear": {"sigma_schedule": "linear"},
    "flow match": {"sigma_schedule": "flow-match"},
    "flow match multistep": {"sigma_schedule": "flow-match-multistep"},
    "uniform": {"sigma_schedule": "default", "timestep_spacing": "linspace"},
    "normal": {"sigma_schedule": "normal"},
    "sgm uniform": {"sigma_schedule": "sgm-uniform"},
    "sgm_uniform": {"sigma_schedule": "sgm-uniform"},
    "simple": {"sigma_schedule": "simple"},
    "trailing": {"sigma_schedule": "default", "timestep_spacing": "trailing"},
    "ddim": {"sigma_schedule": "default", "timestep_spacing": "leading", "steps_offset": 1},
    "ddim_uniform": {"sigma_schedule": "default", "timestep_spacing": "leading", "steps_offset": 1},
    "kl optimal": {"sigma_schedule": "kl-optimal"},
    "kl_optimal": {"sigma_schedule": "kl-optimal"},
    "beta": {"sigma_schedule": "beta"},
    "align your steps": {"sigma_schedule": "align-your-steps"},
    "align your steps sdxl": {"sigma_schedule": "align-your-steps-sdxl"},
    "automatic": {},
}
# our (sigma_schedule, timestep_spacing) -> A1111 schedule type
_SCHEDULE_TYPES = {
    "karras": "Karras", "exponential": "Exponential", "linear": "Linear", "flow-match": "Flow Match",
    "flow-match-multistep": "Flow Match Multistep",
    "kl-optimal": "KL Optimal", "beta": "Beta", "sgm-uniform": "SGM Uniform", "simple": "Simple", "normal": "Normal",
    "align-your-steps": "Align Your Steps", "align-your-steps-sdxl": "Align Your Steps SDXL",
}
_SPACING_TYPES = {"linspace": "Uniform", "trailing": "Trailing", "leading": "DDIM"}
# diffusers' flags for a stock class
_STOCK_FLAGS = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}


def a1111_names(name: str, config: Mapping[str, Any]) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 1.9+ writes them, for a registry name (or diffusers class name) and the
    scheduler's config (`registry.describe` finds the name from a class and config)."""
    sampler = A1111_SAMPLERS.get(name, name)
    schedule = config.get("sigma_schedule", "default")
    if config.get("use_karras_sigmas"):
        schedule = "karras"
    elif config.get("use_exponential_sigmas"):
        schedule = "exponential"
    if schedule in _SCHEDULE_TYPES:
        return sampler, _SCHEDULE_TYPES[schedule]
    return sampler, _SPACING_TYPES.get(config.get("timestep_spacing", "linspace"), "Automatic")


def schedule_types() -> list[str]:
    """The schedule types a form offers, as A1111 names them: "Automatic" (the sampler's own) first."""
    return ["Automatic", *dict.fromkeys([*_SPACING_TYPES.values(), *_SCHEDULE_TYPES.values()])]


def known() -> list[str]:
    """Every A1111 and ComfyUI sampler name `resolve` knows."""
    return sorted(set(_BY_A1111) | set(COMFYUI_SAMPLERS))


def resolve(sampler: str, schedule: str | None = None) -> tuple[str, str | None] | None:
    """(registry name, schedule) for an A1111 sampler name ("DPM++ 2M Karras", "Euler a"), optionally with a
    schedule type ("Karras"), or a ComfyUI sampler + scheduler ("dpmpp_2m", "karras"); None if unknown."""
    name = sampler.strip()
    if schedule is None:  # A1111 before 1.9: the schedule as a suffix of the sampler name
        for suffix in ("Karras", "Exponential"):
            if name.endswith(" " + suffix) and name[: -len(suffix) - 1] in _BY_A1111:
                name, schedule = name[: -len(suffix) - 1], suffix
    found = _BY_A1111.get(name) or COMFYUI_SAMPLERS.get(name)
    return None if found is None else (found, schedule)


def schedule_overrides(schedule: str | None, stock: bool = False) -> dict[str, Any]:
    """Config fields that select `schedule` (A1111 schedule type or ComfyUI scheduler name): ours, or for a
    `stock` diffusers class its flags (`use_karras_sigmas`, ...) and `timestep_spacing`."""
    if schedule is None:
        return {}
    key = schedule.strip().lower()
    if key not in SCHEDULES:
        raise ValueError(f"Unknown schedule type {schedule!r}; known: {', '.join(sorted(SCHEDULES))}.")
    if not stock:
        return dict(SCHEDULES[key])
    fields = dict(SCHEDULES[key])
    level = fields.pop("sigma_schedule", "default")
    if level not in ("default", *_STOCK_FLAGS):
        raise ValueError(f"diffusers' schedulers have no {schedule!r} schedule; use one of ours "
                         "(registry.available()).")
    return {**fields, **_STOCK_FLAGS.get(level, {})}


# A1111 sampler name -> registry name: ours where we implement it, else the diffusers class.
_BY_A1111 = {a1111: name for name, a1111 in reversed(list(A1111_SAMPLERS.items()))}
