"""`swap_scheduler(pipe, name, **overrides)`: a checked scheduler swap.

diffusers' `NewScheduler.from_config(pipe.scheduler.config)` silently carries the keys
the new class knows and drops the others, so a v-prediction or zero-terminal-SNR model
can lose its `prediction_type` or schedule without a word. A swap here splits the
config in two:

* what belongs to the **model** (`MODEL_KEYS`: prediction type, training betas and
  schedule, zero-terminal-SNR rescale, sample clipping range) is always kept; an
  override that would change it is refused;
* what belongs to the **sampler** comes from the user's overrides, else the new class'
  defaults; the spacing convention of the model's config (`timestep_spacing`,
  `steps_offset`, `set_alpha_to_one`) is carried over unless overridden, when it was
  set in the config rather than filled in by the old class' defaults. A
  zero-terminal-SNR model gets trailing spacing by default (Lin et al. 2023, Sec. 3.3),
  and guidance rescale 0.7 is recommended for it (the pipeline applies it by default).

The new scheduler is then checked: every model key must have survived, and one probe
step must run (a sampler that cannot handle the model's prediction type fails there).
An incompatible swap raises `SchedulerSwapError` with the reason and leaves the
pipeline unchanged; a successful one returns a `SwapReport` saying what changed.

`name` is a name from `custom_schedulers.registry` (our schedulers) or the class name
of a diffusers scheduler ("DDIMScheduler", "EulerDiscreteScheduler", ...). Works on
our pipeline and on a stock `StableDiffusionPipeline` (only `pipe.scheduler` is used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from custom_schedulers import registry
from custom_schedulers.base import translate_sigma_flags
from custom_schedulers.parameterization import check_zero_terminal_snr
from ldm_pipeline.guidance import recommended_guidance_rescale

logger = logging.getLogger(__name__)

MODEL_KEYS = (
    "prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
    "rescale_betas_zero_snr", "clip_sample", "thresholding", "shift",
)
# carried over unless overridden: the spacing convention and the ranges of clipping/thresholding
CARRIED_KEYS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample_range", "sample_max_value")
TRIVIAL_VALUES = (None, False)  # a model key with such a value may be absent from the new class


def is_trivial(key: str, model: dict) -> bool:
    """A model key whose value changes nothing, so a class without that option can still keep the model."""
    if key == "shift":  # the resolution shift only acts on rectified-flow schedules
        return model.get("beta_schedule") != "flow" or model[key] == 1.0
    return model[key] in TRIVIAL_VALUES


class SchedulerSwapError(ValueError):
    """The requested scheduler cannot sample this model; the message says why."""


@dataclass
class SwapReport:
    old_class: str
    new_class: str
    kept: dict  # model keys carried over unchanged
    changed: dict  # key -> (old value, new value) for sampler keys that differ
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"scheduler: {self.old_class} -> {self.new_class}"]
        lines += [f"  kept {k} = {v!r}" for k, v in self.kept.items()]
        lines += [f"  changed {k}: {a!r} -> {b!r}" for k, (a, b) in self.changed.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def available_schedulers() -> list[str]:
    """Names `swap_scheduler` accepts: our registry's short names, then diffusers' scheduler classes."""
    return list(registry.available())


def init_keys(cls: type) -> set[str]:
    """The config keys a scheduler class really takes (diffusers stores unknown ones in `config` too):
    diffusers' own `ConfigMixin._get_init_keys`, which our samplers' base extends up their class chain."""
    return cls._get_init_keys(cls) - {"self", "args", "kwargs"}


def scheduler_class(name: str) -> tuple[type, bool]:
    """(class, built by our registry?) for a registry name or a diffusers scheduler class name."""
    if registry.is_ours(name):
        return type(registry.build(name, {})), True
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise SchedulerSwapError(f"Unknown scheduler {name!r}. Available: {', '.join(available_schedulers())}.")
    return cls, False


def build_scheduler(name: str, config: dict, overrides: dict) -> SchedulerMixin:
    """Instantiate `name` from the keys of `config` its class takes, after checking no model key is lost.

    Ours are built by `registry.build` with the overrides passed as overrides, so they win over the
    options a preset name implies (dpmpp-2m-pc's exponential sigma_schedule), exactly as `build` does."""
    cls, ours = scheduler_class(name)
    accepted = init_keys(cls)
    check_model_keys_accepted(config, accepted, name)
    config = {k: v for k, v in config.items() if k in accepted}
    return registry.build(name, config, **overrides) if ours else cls.from_config(config)


def checked_overrides(name: str, overrides: dict) -> dict:
    """The user's sampler options in the class's own terms; an option the class lacks is an error, not dropped."""
    cls, ours = scheduler_class(name)
    try:
        registry.check_options(name, cls, overrides)
        return translate_sigma_flags(overrides) if ours else overrides  # use_karras_sigmas -> sigma_schedule
    except ValueError as error:
        raise SchedulerSwapError(str(error)) from None


def is_zero_terminal_snr(config) -> bool:
    return bool(config.get("rescale_betas_zero_snr", False))


def new_config(old: dict, overrides: dict) -> tuple[dict, list[str]]:
    """Model keys from `old`, the spacing convention carried over, then the user's overrides."""
    clashes = {k: v for k, v in overrides.items() if k in MODEL_KEYS and old.get(k) != v}
    if clashes:
        detail = ", ".join(f"{k}={v!r} (model: {old.get(k)!r})" for k, v in clashes.items())
        raise SchedulerSwapError(
            f"{detail}: these belong to the model (how it was trained), not to the sampler, and a swap cannot "
            "change them. If the model's scheduler config is wrong, fix scheduler/scheduler_config.json."
        )
    defaulted = set(old.get("_use_default_values", ()))  # keys the old class filled in itself
    config = {k: old[k] for k in MODEL_KEYS if k in old}
    config.update({k: old[k] for k in CARRIED_KEYS if k in old and k not in defaulted})
    notes = []
    if is_zero_terminal_snr(old) and "timestep_spacing" not in overrides:
        config["timestep_spacing"] = "trailing"
        notes.append("zero-terminal-SNR model: trailing timestep spacing (Lin et al. 2023), "
                     f"guidance_rescale {recommended_guidance_rescale(old)} recommended")
    config.update(overrides)
    return config, notes


def check_model_keys_accepted(model: dict, accepted: set[str], name: str) -> None:
    """A model key the class does not take is only acceptable with a trivial value (None/False)."""
    for key in MODEL_KEYS:
        if key in model and key not in accepted and not is_trivial(key, model):
            raise SchedulerSwapError(
                f"{name} has no `{key}` option, so it cannot keep this model's {key}={model[key]!r}; choose a "
                "scheduler that supports it."
            )


def check_model_keys_kept(old: dict, scheduler: SchedulerMixin, name: str) -> dict:
    """Every model key of `old` the new class takes must have kept its value."""
    accepted = init_keys(type(scheduler))
    check_model_keys_accepted(old, accepted, name)
    kept, new = {}, scheduler.config
    for key in MODEL_KEYS:
        if key not in old or key not in accepted:
            continue
        if new.get(key) != old[key] and not _same_values(new.get(key), old[key]):
            raise SchedulerSwapError(f"{name} changed the model's {key} from {old[key]!r} to {new.get(key)!r}.")
        kept[key] = old[key]
    return kept


def _same_values(a, b) -> bool:
    try:
        return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    except (TypeError, ValueError, RuntimeError):
        return False


def probe_step(scheduler: SchedulerMixin, name: str) -> None:
    """Run two steps on a fresh copy; a sampler that cannot handle the model fails here, not mid-generation."""
    probe = type(scheduler).from_config(scheduler.config)
    try:
        probe.set_timesteps(10)
        x = torch.zeros(1, 4, 4, 4)
        for t in probe.timesteps[:2]:
            x = probe.step(probe.scale_model_input(x, t) * 0, t, x, return_dict=False)[0]
    except Exception as error:
        raise SchedulerSwapError(
            f"{name} cannot sample this model (prediction_type={scheduler.config.get('prediction_type')!r}): "
            f"{type(error).__name__}: {error}"
        ) from error


def check_singular(config: dict) -> None:
    try:
        check_zero_terminal_snr(config.get("prediction_type", "epsilon"), is_zero_terminal_snr(config))
    except ValueError as error:
        raise SchedulerSwapError(str(error)) from None


def swap_scheduler(pipe, name: str, **overrides) -> SwapReport:
    """Replace `pipe.scheduler` by `name`, keeping the model's keys; see the module docstring."""
    old = dict(pipe.scheduler.config)
    overrides = checked_overrides(name, overrides)
    config, notes = new_config(old, overrides)
    check_singular(config)
    scheduler = build_scheduler(name, config, overrides)
    kept = check_model_keys_kept(old, scheduler, name)
    probe_step(scheduler, name)
    changed = {
        k: (old.get(k), scheduler.config[k]) for k in init_keys(type(scheduler)) & (set(old) | set(overrides))
        if k not in MODEL_KEYS and old.get(k) != scheduler.config.get(k)
    }
    report = SwapReport(type(pipe.scheduler).__name__, type(scheduler).__name__, kept, changed, notes)
    pipe.scheduler = scheduler
    logger.info("%s", report)
    return report


def scheduler_from_recipe(recipe: dict) -> SchedulerMixin:
    """The scheduler a PNG recipe recorded: its class (ours or diffusers') built from the stored config."""
    stored = recipe.get("scheduler") or {}
    if "class" not in stored:
        raise SchedulerSwapError("The recipe names no scheduler class; choose a sampler by name instead.")
    cls, _ = scheduler_class(stored["class"])
    return cls.from_config(stored.get("config") or {})


def use_trailing_spacing_if_zero_terminal_snr(pipe) -> SwapReport | None:
    """A zero-terminal-SNR model whose config samples with other spacing gets trailing spacing,
    so the first step starts at pure noise (Lin et al. 2023, Sec. 3.3); reported in the log."""
    config = pipe.scheduler.config
    if not is_zero_terminal_snr(config) or config.get("timestep_spacing") == "trailing":
        return None
    return swap_scheduler(pipe, type(pipe.scheduler).__name__, timestep_spacing="trailing")
