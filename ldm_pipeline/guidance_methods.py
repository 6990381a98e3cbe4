"""Guidance methods beside classifier-free guidance: APG, CFG++, CFG-Zero* and PAG's guidance term.

Notation as in `guidance`: ``pred_cond`` / ``pred_uncond`` are the model's own predictions (eps, v,
x_0 or u), w the guidance scale. A `StepPoint` says where the sampler is: the model's input
``x_t = alpha x_0 + sigma eps`` at this step, so any prediction converts to x_0, eps or the
flow velocity ``u = eps - x_0`` (`custom_schedulers.parameterization`, the only place that converts).

* ``apg``: adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and
  Artifacts of High Guidance Scales", Alg. 1) on the denoised x_0 predictions: the update
  ``x0_cond - x0_uncond`` (after momentum beta and the norm threshold r) splits into a part
  parallel to ``x0_cond`` and an orthogonal part; the parallel part is scaled by eta;
  guided = ``x0_cond + (w - 1) * update``. eta = 1, r off, beta = 0 is CFG.
* ``cfg-zero*``: CFG-Zero* (Fan et al. 2025, eq. 9 and Sec. 4.2) on the velocity u:
  ``s* = <u_c, u_u> / ||u_u||^2`` per sample, guided = ``s* u_u + w (u_c - s* u_u)``; the first
  K steps are zero-initialised (u = 0: the sample stays put in flow coordinates; no model runs).
  For flow models u is the model's output, as in the reference implementation.
* ``cfg++``: CFG++ (Chung et al. 2024, Alg. 1): the guided x_0 is renoised with the
  *unconditional* noise prediction, ``x_next = alpha_next x0_guided + sigma_next eps_uncond``.
  A stock ``step(pred, t, sample)`` renoises with the eps it derives from (pred, sample), so the
  step is given the sample ``alpha x0_guided + sigma eps_uncond`` and the prediction that names
  (x0_guided, eps_uncond) there: exactly CFG++ for single-step first-order samplers (DDIM, DDPM,
  Euler, Euler a, flow Euler; ComfyUI's ``sample_euler_cfg_pp`` / ``sample_euler_ancestral_cfg_pp``);
  others are refused. w is the paper's lambda (about 0.2-1; ComfyUI's CFG++ samplers take ~1-2).
* PAG (Ahn et al. 2024, eq. 11): ``+ s (pred_cond - pred_perturbed)``, the perturbed pass run with
  identity self-attention (`perturbed_attention`); it adds to any method above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from custom_schedulers.base import translate_diffusers_config
from custom_schedulers.grids import alpha_sigma_at_timestep
from custom_schedulers.parameterization import target, to_x0_eps
from custom_schedulers.schedules import schedule_from_config

METHODS = ("cfg", "apg", "cfg++", "cfg-zero*")
# method -> its parameters (GenerationOptions fields; defaults: `GuidanceMethod`)
PARAMETERS = {"apg": ("apg_eta", "apg_norm_threshold", "apg_momentum"), "cfg-zero*": ("cfg_zero_init_steps",)}
# Samplers whose one `step` renoises the (x_0, eps) it is given: CFG++ through the stock contract is exact there.
CFG_PP_SAMPLERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "rf-euler": "FlowMatchEulerDiscreteScheduler",
}
CFG_PP_CLASSES = {"DDIMSampler", "DDPMSampler", "EulerSampler", "EulerAncestralSampler", "RectifiedFlowEulerSampler",
                  *CFG_PP_SAMPLERS.values()}


# ---------------------------------------------------------------- the formulas


def apg(x0_uncond: torch.Tensor, x0_cond: torch.Tensor, scale: float, eta: float, norm_threshold: float,
        momentum) -> torch.Tensor:
    """APG (Sadat et al. 2024, Alg. 1): x0_cond + (w - 1) * (orthogonal + eta * parallel part of the update).

    diffusers' `normalized_guidance` in its "original formulation" (cond + scale * update) with scale = w - 1
    is the paper's algorithm; norm_threshold 0 = no threshold; `momentum` (`momentum_buffer`) is updated in place."""
    from diffusers.guiders.adaptive_projected_guidance import normalized_guidance  # diffusers' guiders: on use only

    return normalized_guidance(x0_cond, x0_uncond, scale - 1.0, momentum, eta, norm_threshold,
                               use_original_formulation=True)


def cfg_zero_star(u_uncond: torch.Tensor, u_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025, eq. 9): s* u_u + w (u_c - s* u_u), s* = <u_c, u_u> / ||u_u||^2 per sample."""
    from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

    s_star = cfg_zero_star_scale(u_cond.flatten(1), u_uncond.flatten(1)).view(-1, *(1,) * (u_cond.ndim - 1))
    return s_star * u_uncond + scale * (u_cond - s_star * u_uncond)


def momentum_buffer(beta: float):
    """APG's running average of guidance updates (diffusers' `MomentumBuffer`); None for beta 0."""
    if not beta:
        return None
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # imports diffusers' models: ~2 s

    return MomentumBuffer(beta)


def perturbed_attention_term(pred_cond: torch.Tensor, pred_perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """PAG's guidance term (Ahn et al. 2024, eq. 11): s (pred_cond - pred_perturbed)."""
    return scale * (pred_cond - pred_perturbed)


# ---------------------------------------------------------------- where the sampler is


@dataclass(frozen=True)
class StepPoint:
    """The model's input x_t = alpha x_0 + sigma eps at one step, and the model's prediction type."""

    x_t: torch.Tensor
    alpha: float
    sigma: float
    prediction_type: str

    def x0_eps(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_x0_eps(pred, self.x_t, self.alpha, self.sigma, self.prediction_type)

    def prediction(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The model-type prediction naming (x0, eps)."""
        return target(self.prediction_type, x0, eps, self.alpha, self.sigma)

    def from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The model-type prediction whose denoised estimate at x_t is x0."""
        return self.prediction(x0, (self.x_t - self.alpha * x0) / self.sigma)

    def velocity(self, pred: torch.Tensor) -> torch.Tensor:
        x0, eps = self.x0_eps(pred)
        return eps - x0

    def from_velocity(self, u: torch.Tensor) -> torch.Tensor:
        """x_t = alpha x0 + sigma eps with eps - x0 = u  =>  x0 = (x_t - sigma u) / (alpha + sigma)."""
        x0 = (self.x_t - self.sigma * u) / (self.alpha + self.sigma)
        return self.prediction(x0, x0 + u)


class StepPoints:
    """(alpha, sigma) at a scheduler's timesteps (its training schedule, `grids.alpha_sigma_at_timestep`)."""

    def __init__(self, scheduler):
        config = translate_diffusers_config(dict(scheduler.config))
        self.schedule = schedule_from_config(config)
        self.prediction_type = config.get("prediction_type", "epsilon")

    def at(self, timestep, x_t: torch.Tensor) -> StepPoint:
        alpha, sigma = alpha_sigma_at_timestep(self.schedule, torch.tensor([float(timestep)]))
        return StepPoint(x_t, float(alpha[0]), float(sigma[0]), self.prediction_type)


def cfg_pp_step_input(point: StepPoint, pred_guided: torch.Tensor, pred_uncond: torch.Tensor,
                      latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, sample) that make a stock single-step `step` renoise x0_guided with eps_uncond (CFG++).

    The sample alpha x0_g + sigma eps_u is built in the model's input space and brought back to the
    sampler's own scaling (`scale_model_input` is a scalar per step: latents / x_t)."""
    x0_guided, _ = point.x0_eps(pred_guided)
    _, eps_uncond = point.x0_eps(pred_uncond)
    shifted = point.alpha * x0_guided + point.sigma * eps_uncond
    to_sampler = latents.norm() / point.x_t.norm()
    return point.prediction(x0_guided, eps_uncond), shifted * to_sampler


# ---------------------------------------------------------------- the method of one run


@dataclass(frozen=True)
class GuidanceMethod:
    """Which method combines the predictions, and its parameters (see the module docstring)."""

    name: str = "cfg"
    apg_eta: float = 0.0
    apg_norm_threshold: float = 15.0
    apg_momentum: float = -0.5
    cfg_zero_init_steps: int = 1

    @classmethod
    def of(cls, name: str, **given) -> "GuidanceMethod":
        """The method with its parameters: those given (None = the default)."""
        return cls(name, **{k: v for k, v in given.items() if v is not None})

    def describe(self) -> dict:
        """The recipe entry: the name and the chosen method's parameters."""
        return {"name": self.name, **{key: getattr(self, key) for key in PARAMETERS.get(self.name, ())}}

    @property
    def needs_levels(self) -> bool:
        return self.name != "cfg"

    def zero_init(self, step_index: int) -> bool:
        return self.name == "cfg-zero*" and step_index < self.cfg_zero_init_steps


def sampler_problem(method: str, scheduler) -> str | None:
    """Why a guidance method cannot run with this scheduler, or None (only CFG++ is picky)."""
    name = type(scheduler).__name__
    if method != "cfg++" or name in CFG_PP_CLASSES:
        return None
    samplers = ", ".join(f"{short} ({stock})" for short, stock in CFG_PP_SAMPLERS.items())
    return (f"CFG++ (guidance_method='cfg++') renoises with the unconditional noise prediction, which a scheduler's "
            f"stock step takes only in single-step first-order samplers; {name} is not one. Choose one of: "
            f"{samplers}, or another guidance method.")
