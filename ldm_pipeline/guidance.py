"""Classifier-free guidance: the scale w(t), the guidance interval and guidance rescale.

Notation (one convention for the whole module):

* ``pred_cond``, ``pred_uncond``: the model's prediction (eps, v, x_0 or u) with the
  prompt and with the negative/empty prompt; guidance is linear, so it works on any
  prediction type.
* ``tau = t / T`` in [0, 1]: the training timestep as a fraction, 1 = pure noise.
* ``sigma = sigma_t / alpha_t``: the noise level in the variance-exploding (EDM /
  k-diffusion) sense, the one Stable Diffusion users see (about 14.6 at t = 999 for
  SD 1.5); ``log_snr = -2 log(sigma)``.

A guidance *schedule* gives w as a function of tau (constant, linear ramps, cosine,
``linear_down_to_half``: ``w * (0.5 + 0.5 * t/T)``, or any callable). A guidance *interval* limits
guidance to noise levels ``sigma_lo < sigma <= sigma_hi`` (Kynkaenniemi et al. 2024,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality");
outside it the unconditional pass is skipped entirely. Being given in noise level,
the interval means the same at any step count and for any sampler.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from custom_schedulers.base import translate_diffusers_config
from custom_schedulers.grids import level_at_timestep, level_to_alpha_sigma
from custom_schedulers.schedules import NoiseSchedule, make_schedule
from ldm_pipeline.guidance_methods import (
    GuidanceMethod,
    StepPoints,
    apg,
    cfg_pp_step_input,
    cfg_zero_star,
    momentum_buffer,
    perturbed_attention_term,
    sampler_problem,
)
from ldm_pipeline.perturbed_attention import PerturbedAttention

SCHEDULE_NAMES = ("constant", "linear_up", "linear_down", "cosine", "linear_down_to_half")
SCHEDULE_ALIASES = {"seed": "linear_down_to_half"}  # the old name, still read so old recipes reproduce
ScaleFunction = Callable[[float], float]


# ---------------------------------------------------------------- the two formulas


def cfg(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): uncond + w * (cond - uncond)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescale_guidance(guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eqs. 15-16): match the per-sample std of the guided
    prediction to the conditional one, then mix the two by phi."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (pred_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


# ---------------------------------------------------------------- w(t)


def schedule_multiplier(name: str, tau: float) -> float:
    """The ramp r(tau) in [0, 1] of a named schedule; w(tau) = w_min + (w - w_min) * r(tau).

    linear_up / cosine increase towards the clean end, as Wang et al. 2024 ("Analysis of
    Classifier-Free Guidance Weight Schedulers") recommend; linear_down decreases.
    """
    if name == "constant":
        return 1.0
    if name == "linear_up":
        return 1.0 - tau
    if name == "linear_down":
        return tau
    if name == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * (1.0 - tau)))
    raise ValueError(f"Unknown guidance schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)} or a callable.")


def guidance_scale_at(scale: float, schedule: Union[str, ScaleFunction], tau: float, min_scale: float) -> float:
    """w at tau = t/T for a named schedule or a callable tau -> w."""
    if callable(schedule):
        return float(schedule(tau))
    if schedule == "linear_down_to_half":
        return scale * (0.5 + 0.5 * tau)  # w at pure noise down to w/2 at the clean end
    return min_scale + (scale - min_scale) * schedule_multiplier(schedule, tau)


# ---------------------------------------------------------------- interval


@dataclass(frozen=True)
class GuidanceInterval:
    """Guidance is applied where sigma_lo < sigma <= sigma_hi (sigma = sigma_t / alpha_t).

    Kynkaenniemi et al. 2024 use (0.28, 5.42] for SD-XL; `from_log_snr` takes the same
    interval as log-SNR bounds.
    """

    sigma_lo: float = 0.0
    sigma_hi: float = math.inf

    def __post_init__(self):
        if not (0.0 <= self.sigma_lo < self.sigma_hi):
            raise ValueError(
                f"Guidance interval needs 0 <= sigma_lo < sigma_hi, got ({self.sigma_lo}, {self.sigma_hi})."
            )

    @classmethod
    def from_log_snr(cls, log_snr_lo: float, log_snr_hi: float) -> "GuidanceInterval":
        """The interval log_snr_lo <= log_snr < log_snr_hi (log_snr = -2 log sigma)."""
        return cls(sigma_lo=math.exp(-0.5 * log_snr_hi), sigma_hi=math.exp(-0.5 * log_snr_lo))

    def contains(self, sigma: float) -> bool:
        return self.sigma_lo < sigma <= self.sigma_hi

    def as_dict(self) -> dict:
        return {"sigma_lo": self.sigma_lo, "sigma_hi": self.sigma_hi}


def as_interval(value) -> GuidanceInterval | None:
    """None, a GuidanceInterval, a (sigma_lo, sigma_hi) pair or {"sigma_lo":..,"sigma_hi":..} /
    {"log_snr_lo":..,"log_snr_hi":..}."""
    if value is None or isinstance(value, GuidanceInterval):
        return value
    if isinstance(value, dict):
        if set(value) == {"log_snr_lo", "log_snr_hi"}:
            return GuidanceInterval.from_log_snr(float(value["log_snr_lo"]), float(value["log_snr_hi"]))
        if set(value) <= {"sigma_lo", "sigma_hi"}:
            return GuidanceInterval(**{k: float(v) for k, v in value.items()})
    elif len(value) == 2:
        return GuidanceInterval(float(value[0]), float(value[1]))
    raise ValueError(
        f"Cannot read guidance interval {value!r}: give (sigma_lo, sigma_hi), "
        "{'sigma_lo': .., 'sigma_hi': ..} or {'log_snr_lo': .., 'log_snr_hi': ..}."
    )


class NoiseLevels:
    """sigma = sigma_t / alpha_t at any (fractional) timestep of a scheduler's training schedule.

    The schedule is the one `custom_schedulers` builds from the scheduler's config, and the level
    between grid points is `grids.level_at_timestep`'s (linear in t, as diffusers' Euler
    scheduler interpolates); it is +inf where alpha_t = 0 (zero terminal SNR).
    """

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseLevels":
        """From the scheduler's config (VP or rectified flow, ours or diffusers')."""
        config = translate_diffusers_config(dict(scheduler.config))
        if "beta_schedule" not in config and config.get("trained_betas") is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no `beta_schedule` in its config, so the noise level of its "
                "timesteps is unknown; a guidance interval needs a scheduler built on a training noise schedule."
            )
        keys = inspect.signature(make_schedule).parameters
        return cls(make_schedule(**{k: v for k, v in config.items() if k in keys}))

    def sigma(self, timestep) -> float:
        t = min(max(float(timestep), 0.0), self.schedule.num_train_timesteps - 1.0)
        level = level_at_timestep(self.schedule, torch.tensor([t]))
        if self.schedule.kind == "vp":  # the native level is sigma/alpha itself
            return float(level[0])
        alpha, sigma = level_to_alpha_sigma(level, "flow")  # native level s: alpha = 1 - s, sigma = s
        return float(sigma[0] / alpha[0]) if alpha[0] > 0 else math.inf


# ---------------------------------------------------------------- everything together


@dataclass(frozen=True)
class Guidance:
    """How the conditional and unconditional predictions are combined at each step.

    scale       w of classifier-free guidance (1 = conditional only, no unconditional pass)
    schedule    "constant" | "linear_up" | "linear_down" | "cosine" | "linear_down_to_half" | callable(tau) -> w
                (the old name "seed" of linear_down_to_half is accepted and recorded as the new name)
    min_scale   w at the far end of the ramps (linear_up, linear_down, cosine); unused otherwise
    interval    GuidanceInterval in noise level, or None for every step
    rescale     phi of guidance rescale (0 = off; 0.7 for zero-terminal-SNR models)
    method      GuidanceMethod: "cfg" | "apg" | "cfg++" | "cfg-zero*" and its parameters (`guidance_methods`)
    pag         PerturbedAttention (scale, layers), or None: PAG's term, added to any method
    """

    scale: float = 7.5
    schedule: Union[str, ScaleFunction] = "constant"
    min_scale: float = 1.0
    interval: GuidanceInterval | None = None
    rescale: float = 0.0
    num_train_timesteps: int = field(default=1000, compare=False)
    method: GuidanceMethod = GuidanceMethod()
    pag: PerturbedAttention | None = None

    def __post_init__(self):
        if isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", SCHEDULE_ALIASES.get(self.schedule, self.schedule))
        if not callable(self.schedule) and self.schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"Unknown guidance schedule {self.schedule!r}; valid: {', '.join(SCHEDULE_NAMES)} or a callable."
            )
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.rescale}.")

    def scale_at(self, timestep) -> float:
        tau = min(max(float(timestep) / self.num_train_timesteps, 0.0), 1.0)
        return guidance_scale_at(self.scale, self.schedule, tau, self.min_scale)

    def combine(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Plain CFG with this guidance's rescale (the methods and PAG run through `Guider`)."""
        guided = cfg(pred_uncond, pred_cond, scale)
        return rescale_guidance(guided, pred_cond, self.rescale) if self.rescale > 0 else guided

    def describe(self) -> dict:
        """A JSON-friendly description (a callable schedule is recorded by name only)."""
        schedule = self.schedule if isinstance(self.schedule, str) else f"callable:{getattr(self.schedule, '__name__', '?')}"
        described = {
            "scale": self.scale, "schedule": schedule, "min_scale": self.min_scale,
            "interval": self.interval.as_dict() if self.interval else None, "rescale": self.rescale,
        }
        if self.method.name != "cfg":  # recipes of plain CFG stay as they were
            described["method"] = self.method.describe()
        if self.pag is not None:
            described["pag"] = self.pag.describe()
        return described


class GuidancePlan:
    """Per-step decisions for one sampling run: the scale and whether the unconditional pass runs."""

    def __init__(self, guidance: Guidance, scheduler):
        self.guidance = guidance
        self.levels = NoiseLevels.from_scheduler(scheduler) if guidance.interval is not None else None

    def inside(self, timestep) -> bool:
        """Whether guidance is on at this step (always, without an interval)."""
        return self.levels is None or self.guidance.interval.contains(self.levels.sigma(timestep))

    def scale_at(self, timestep) -> float:
        """w at this step, or 1.0 where the interval switches guidance off."""
        return self.guidance.scale_at(timestep) if self.inside(timestep) else 1.0

    def scales(self, timesteps) -> list[float]:
        """w for every step of a run; a schedule giving a non-finite w is refused before any step runs."""
        scales = [self.scale_at(t) for t in torch.as_tensor(timesteps).tolist()]
        for step, w in enumerate(scales, start=1):
            if not math.isfinite(w):
                raise ValueError(f"Guidance schedule (guidance_schedule) gave w = {w} at step {step}: a schedule "
                                 "must return a finite guidance scale.")
        return scales

    @staticmethod
    def needs_uncond(scale: float) -> bool:
        return scale != 1.0


class Guider:
    """One sampling run: the UNet passes of each step, and how their predictions become the sampler's input.

    A step runs the passes ("uncond", "cond", "perturbed") it needs in one batched UNet call: "uncond"
    where CFG's w != 1 (CFG++: wherever the interval allows, its w = 1 still renoises with the
    unconditional eps), "perturbed" with PAG, none on CFG-Zero*'s zero-initialised steps.
    `guide` then returns (prediction, sample) for the sampler's stock `step(prediction, t, sample)`.
    """

    def __init__(self, guidance: Guidance, scheduler, timesteps):
        self.guidance, self.method = guidance, guidance.method
        if sampler_problem(self.method.name, scheduler):
            raise ValueError(sampler_problem(self.method.name, scheduler))
        plan, steps = GuidancePlan(guidance, scheduler), torch.as_tensor(timesteps).tolist()
        self.scales = plan.scales(steps)  # w per step; 1.0 = no unconditional pass (CFG)
        self.passes = [self._passes(i, plan.inside(t), w) for i, (t, w) in enumerate(zip(steps, self.scales))]
        self.points = StepPoints(scheduler) if self.method.needs_levels else None
        momentum = self.method.apg_momentum if self.method.name == "apg" else 0.0
        self.momentum = momentum_buffer(momentum)

    def _passes(self, step: int, inside: bool, scale: float) -> tuple[str, ...]:
        if self.method.zero_init(step):
            return ()
        uncond = inside if self.method.name == "cfg++" else GuidancePlan.needs_uncond(scale)
        return ("uncond",) * uncond + ("cond",) + ("perturbed",) * (self.guidance.pag is not None)

    @property
    def needs_uncond(self) -> bool:
        return any("uncond" in passes for passes in self.passes)

    def guide(self, step: int, preds: dict, timestep, x_in: torch.Tensor, latents: torch.Tensor):
        """(prediction, sample) for the sampler from this step's predictions {pass: tensor} at x_in."""
        point = self.points.at(timestep, x_in) if self.points is not None else None
        if not preds:  # CFG-Zero*'s zero initialisation: u = 0
            return point.from_velocity(torch.zeros_like(x_in)), latents
        cond, uncond = preds["cond"], preds.get("uncond")
        pred = cond if uncond is None else self.combine(point, uncond, cond, self.scales[step])
        if "perturbed" in preds:
            pred = pred + perturbed_attention_term(cond, preds["perturbed"], self.guidance.pag.scale)
        if uncond is not None and self.guidance.rescale > 0:
            pred = rescale_guidance(pred, cond, self.guidance.rescale)
        if self.method.name == "cfg++" and uncond is not None:
            return cfg_pp_step_input(point, pred, uncond, latents)
        return pred, latents

    def combine(self, point, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The method's guided prediction (CFG++ combines as CFG; its renoising comes in `guide`)."""
        m = self.method
        if m.name == "apg":  # on the denoised x_0, as the paper
            x0 = apg(point.x0_eps(pred_uncond)[0], point.x0_eps(pred_cond)[0], scale, m.apg_eta,
                     m.apg_norm_threshold, self.momentum)
            return point.from_x0(x0)
        if m.name == "cfg-zero*":  # on the flow velocity u, as the paper
            return point.from_velocity(cfg_zero_star(point.velocity(pred_uncond), point.velocity(pred_cond), scale))
        return cfg(pred_uncond, pred_cond, scale)


def recommended_guidance_rescale(scheduler_config) -> float:
    """0.7 for a zero-terminal-SNR schedule (Lin et al. 2023, Sec. 3.4), else 0 (off)."""
    return 0.7 if scheduler_config.get("rescale_betas_zero_snr", False) else 0.0
