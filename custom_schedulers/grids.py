"""Sampling grids: which noise levels a sampler visits, and which timestep the model sees there.

A grid has ``N`` model-evaluation nodes, from noisiest to cleanest, plus a final node
at ``sigma = 0`` (the last step returns the x_0 estimate: "a better final step"
than stopping at the last training timestep).

Noise levels are written in the schedule's *native level*: the VE noise level
``sigma/alpha`` for VP schedules (what diffusers' Euler/DPM-Solver and k-diffusion
call ``sigmas``), and the flow time ``s = sigma`` for rectified flow (diffusers'
FlowMatch ``sigmas``). The model timestep is the (possibly fractional) training
timestep for VP schedules and ``s * T`` for flow (diffusers' FlowMatch convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from .schedules import NoiseSchedule, inverse_interpolate, shift_sigmas

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SigmaSchedule = Literal[
    "default", "karras", "exponential", "linear", "kl-optimal", "flow-match", "beta", "sgm-uniform", "simple",
    "normal", "align-your-steps", "align-your-steps-sdxl", "flow-match-multistep",
]
SIGMA_SCHEDULES = (
    "default", "karras", "exponential", "linear", "kl-optimal", "flow-match", "beta", "sgm-uniform", "simple",
    "normal", "align-your-steps", "align-your-steps-sdxl", "flow-match-multistep",
)


@dataclass(frozen=True)
class SamplingGrid:
    """Model timesteps at the N evaluation nodes; (alpha, sigma) at those nodes and the final sigma = 0 node."""

    timesteps: torch.Tensor  # (N,) float64
    alpha: torch.Tensor  # (N + 1,) float64, alpha[-1] = 1
    sigma: torch.Tensor  # (N + 1,) float64, sigma[-1] = 0

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def lambdas(self) -> torch.Tensor:
        """lambda = log(alpha / sigma): -inf at zero terminal SNR, +inf at the final node."""
        return torch.log(self.alpha) - torch.log(self.sigma)


# ---------------------------------------------------------------- timestep spacings (diffusers' names)


def spaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0) -> torch.Tensor:
    """Training timesteps, high to low, as diffusers' DDIMScheduler spaces them (Lin et al. 2023, Table 2)."""
    T, N = num_train_timesteps, num_steps
    if spacing == "leading":
        t = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / N)) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, N).round()[::-1]
    else:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; valid values: {', '.join(TIMESTEP_SPACINGS)}.")
    return torch.from_numpy(t.astype(np.float64).copy())


def lcm_timesteps(num_steps: int, original_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Training timesteps, high to low, picked evenly from LCM's skipping-step grid of `original_steps` DDIM steps
    (t = k*i - 1, k = T // original_steps; Luo et al. 2023, Sec. 4.2), as diffusers' LCMScheduler picks them."""
    _check_num_steps(num_steps, num_train_timesteps)
    if num_steps > original_steps:
        raise ValueError(f"num_inference_steps must be from 1 to original_inference_steps ({original_steps}), "
                         f"got {num_steps}: LCM samples on the grid it was distilled on. Raise "
                         f"original_inference_steps, or set it to None to use timestep_spacing instead.")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picked = np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[picked].astype(np.float64).copy())


# ---------------------------------------------------------------- noise-level schedules


def karras_levels(level_min: float, level_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    min_inv, max_inv = level_min ** (1 / rho), level_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_levels(level_min: float, level_max: float, num_steps: int) -> torch.Tensor:
    """Uniform in log sigma, i.e. uniform in log-SNR (Lu et al. 2022a, DPM-Solver, Sec. 3.3 'logSNR' steps)."""
    return torch.linspace(np.log(level_max), np.log(level_min), num_steps, dtype=torch.float64).exp()


def linear_levels(level_min: float, level_max: float, num_steps: int) -> torch.Tensor:
    """Uniform in the native level (flow matching's uniform time grid; Lipman et al. 2023)."""
    return torch.linspace(level_max, level_min, num_steps, dtype=torch.float64)


def kl_optimal_levels(level_min: float, level_max: float, num_steps: int) -> torch.Tensor:
    """Uniform in arctan(sigma): the KL-optimal schedule for a single Gaussian (Sabour et al. 2024, Align Your
    Steps, Theorem 3.1; ComfyUI's `kl_optimal`)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return (ramp * math.atan(level_min) + (1 - ramp) * math.atan(level_max)).tan()


LEVEL_SCHEDULES = {"karras": karras_levels, "exponential": exponential_levels, "linear": linear_levels,
                   "kl-optimal": kl_optimal_levels}

# Align Your Steps' published 10-step noise levels sigma/alpha, noisiest first (Sabour et al. 2024, Table 3).
ALIGN_YOUR_STEPS = {
    "align-your-steps": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),  # SD 1.5
    "align-your-steps-sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def align_your_steps_levels(table: Sequence[float], num_steps: int) -> torch.Tensor:
    """The N evaluation levels of an Align Your Steps table: its N+1 levels log-linearly interpolated to N+1 (exact
    for the published 10 steps), the last (the sampler's end) dropped for our final sigma = 0 (as ComfyUI's
    `AlignYourStepsScheduler`; the paper's "how-to" interpolation)."""
    log_levels = np.log(np.asarray(table, dtype=np.float64)[::-1])
    positions = np.linspace(0, 1, len(table))
    levels = np.exp(np.interp(np.linspace(0, 1, num_steps + 1), positions, log_levels))[::-1]
    return torch.from_numpy(levels[:-1].copy())


def schedule_timesteps(name: str, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Fractional training timesteps, high to low, of ComfyUI's timestep-space schedulers: "sgm-uniform" and
    "normal" (linspace from T-1 to 0, without / with the endpoint), "simple" (every (T/N)-th training level from
    the top) and "beta" (Lee et al. 2024, "Beta Sampling is All You Need": t = (T-1) Beta(0.6, 0.6)-quantiles)."""
    T, N = num_train_timesteps, num_steps
    if name == "sgm-uniform":
        return torch.linspace(T - 1, 0, N + 1, dtype=torch.float64)[:-1]
    if name == "normal":
        return torch.linspace(T - 1, 0, N, dtype=torch.float64)
    if name == "simple":
        return torch.from_numpy((T - 1 - np.floor(np.arange(N) * T / N)).astype(np.float64))
    from scipy.stats import beta  # scipy: a test/benchmark dependency, needed only for this schedule

    return torch.from_numpy((T - 1) * beta.ppf(1 - np.arange(N) / N, 0.6, 0.6))


TIMESTEP_SCHEDULES = ("sgm-uniform", "normal", "simple", "beta")


def flow_match_levels(schedule: NoiseSchedule, num_steps: int, shift: float) -> torch.Tensor:
    """diffusers' `FlowMatchEulerDiscreteScheduler` grid: s uniform from 1 down to the training grid's smallest
    (shifted) level, then shifted (Esser et al. 2024, SD3, Sec. 5.3.2; the smallest level is shifted twice there)."""
    s_min = float(native_levels(schedule)[0])
    return shift_sigmas(torch.linspace(1.0, s_min, num_steps, dtype=torch.float64), shift)


def flow_match_multistep_levels(num_steps: int, num_train_timesteps: int, shift: float) -> torch.Tensor:
    """The flow grid of diffusers' multistep schedulers (`UniPCMultistepScheduler`, `DPMSolverMultistepScheduler`
    with `use_flow_sigmas`): s uniform from 1 to 1/T over N + 1 points, the last dropped, then shifted. Unlike
    FlowMatchEuler's grid it has no node near s = 0, whose lopsided last step a multistep extrapolation overshoots."""
    ramp = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1, dtype=torch.float64)[:-1]
    return shift_sigmas(ramp, shift)


# ---------------------------------------------------------------- native level <-> (alpha, sigma)


def native_levels(schedule: NoiseSchedule) -> torch.Tensor:
    """The native level on the training grid: sigma/alpha (VP; inf at zero terminal SNR) or s (flow)."""
    if schedule.kind == "flow":
        return schedule.sigma.clone()
    return schedule.sigma / schedule.alpha


def level_to_alpha_sigma(level: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of native levels; VP: alpha = 1/sqrt(1 + l^2), sigma = l alpha (l = inf -> (0, 1))."""
    level = torch.as_tensor(level, dtype=torch.float64)
    if kind == "flow":
        return 1.0 - level, level.clone()
    alpha = 1.0 / torch.sqrt(1.0 + level**2)
    sigma = torch.where(torch.isinf(level), torch.ones_like(level), level * alpha)
    return alpha, sigma


def grid_levels(grid: SamplingGrid, kind: str) -> torch.Tensor:
    """The native level at a grid's N evaluation nodes (diffusers' Euler/DPM `sigmas` without the final 0)."""
    sigma = grid.sigma[:-1]
    return sigma.clone() if kind == "flow" else sigma / grid.alpha[:-1]


def level_at_timestep(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """Native level at fractional training timesteps, linear in t (as diffusers' Euler interpolates sigmas)."""
    levels = native_levels(schedule)
    t = torch.as_tensor(timesteps, dtype=torch.float64)
    low = t.floor().long().clamp(0, schedule.num_train_timesteps - 1)
    high = (low + 1).clamp(max=schedule.num_train_timesteps - 1)
    w = t - low
    # Exact on integer timesteps, also where the next level is infinite (zero terminal SNR).
    return torch.where(w == 0, levels[low], levels[low] + w * (levels[high] - levels[low]))


def alpha_sigma_at_timestep(schedule: NoiseSchedule, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at model timesteps: training timesteps for VP, s*T for flow."""
    t = torch.as_tensor(timesteps, dtype=torch.float64)
    if schedule.kind == "flow":
        return level_to_alpha_sigma(t / schedule.num_train_timesteps, "flow")
    return level_to_alpha_sigma(level_at_timestep(schedule, t), "vp")


def timestep_from_level(schedule: NoiseSchedule, levels: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of native levels: the exact inverse of `level_at_timestep`
    (levels increase with t); levels beyond the grid clamp to 0 or T-1 (T-1 also beyond the largest finite one)."""
    grid, T = native_levels(schedule), schedule.num_train_timesteps
    target = torch.as_tensor(levels, dtype=torch.float64)
    t = inverse_interpolate(grid, torch.arange(T, dtype=torch.float64), target)
    return torch.where(target > grid[torch.isfinite(grid)][-1], torch.full_like(t, T - 1.0), t)


def model_timesteps(schedule: NoiseSchedule, levels: torch.Tensor) -> torch.Tensor:
    """The timestep the model sees at native levels: s*T (flow) or the training timestep (VP)."""
    if schedule.kind == "flow":
        return levels * schedule.num_train_timesteps
    return timestep_from_level(schedule, levels)


# ---------------------------------------------------------------- the grid


def _check_descending(values: torch.Tensor, what: str) -> None:
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"custom {what} must be a non-empty 1-D sequence, got shape {tuple(values.shape)}.")
    if torch.any(values[1:] >= values[:-1]):
        raise ValueError(f"custom {what} must be strictly decreasing (noisiest first), got {values.tolist()}.")


def _levels_from_sigmas(sigmas: Sequence[float], schedule: NoiseSchedule) -> torch.Tensor:
    levels = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if levels.numel() > 1 and levels[-1] == 0:
        levels = levels[:-1]  # the final sigma = 0 node is always added
    _check_descending(levels, "sigmas")
    upper = 1.0 if schedule.kind == "flow" else float("inf")
    if levels[-1] <= 0 or levels[0] > upper:
        raise ValueError(f"custom sigmas must lie in (0, {upper}] for a {schedule.kind} schedule, got {levels.tolist()}.")
    return levels


def _timesteps_in_range(t: torch.Tensor, schedule: NoiseSchedule, what: str) -> torch.Tensor:
    _check_descending(t, what)
    T = schedule.num_train_timesteps
    # Flow timesteps are s*T with s in (0, 1]; VP timesteps are training timesteps in [0, T-1].
    flow = schedule.kind == "flow"
    high = float(T) if flow else T - 1.0
    if (t[-1] <= 0 if flow else t[-1] < 0) or t[0] > high:
        interval = f"(0, {T}]" if flow else f"[0, {T - 1}]"
        raise ValueError(
            f"{what} must lie in {interval} (num_train_timesteps = {T}), got {t[-1].item():g}..{t[0].item():g}."
        )
    return t


def _grid_from_levels(levels: torch.Tensor, timesteps: torch.Tensor, kind: str) -> SamplingGrid:
    alpha, sigma = level_to_alpha_sigma(levels, kind)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    return SamplingGrid(timesteps=timesteps, alpha=torch.cat([alpha, one]), sigma=torch.cat([sigma, zero]))


def level_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """(min, max) native level of the training grid; the max is the largest finite one."""
    levels = native_levels(schedule)
    return float(levels[0]), float(levels[torch.isfinite(levels)][-1])


def build_grid(
    schedule: NoiseSchedule, num_steps: int | None, spacing: str = "trailing", steps_offset: int = 0,
    sigma_schedule: str = "default", timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
    sigma_min: float | None = None, shift: float = 1.0,
) -> SamplingGrid:
    """The sampling grid from a step count and spacing, a noise-level schedule, or custom timesteps / sigmas.

    With sigma_schedule "flow-match" (flow schedules only) custom sigmas are shifted by `shift`, as diffusers'
    FlowMatch schedulers shift them; otherwise they are taken literally."""
    T, kind = schedule.num_train_timesteps, schedule.kind
    if sigma_schedule.startswith("flow-match") and kind != "flow":
        raise ValueError(f'sigma_schedule "{sigma_schedule}" needs a rectified-flow schedule (beta_schedule "flow"); '
                         f"for this {kind} schedule use one of: default, karras, exponential, linear.")
    if timesteps is not None and sigmas is not None:
        raise ValueError("Pass either custom `timesteps` or custom `sigmas`, not both.")
    if sigmas is not None:
        levels = _levels_from_sigmas(sigmas, schedule)
        if sigma_schedule.startswith("flow-match"):
            levels = shift_sigmas(levels, shift)
        return _grid_from_levels(levels, model_timesteps(schedule, levels), kind)
    if timesteps is not None:
        t = _timesteps_in_range(torch.as_tensor(timesteps, dtype=torch.float64).flatten(), schedule, "custom timesteps")
        return SamplingGrid(t, *_append_final(*alpha_sigma_at_timestep(schedule, t)))
    _check_num_steps(num_steps, T)
    if sigma_schedule.startswith("flow-match"):
        levels = (flow_match_levels(schedule, num_steps, shift) if sigma_schedule == "flow-match"
                  else flow_match_multistep_levels(num_steps, T, shift))
        return _grid_from_levels(levels, model_timesteps(schedule, levels), kind)
    if sigma_schedule in TIMESTEP_SCHEDULES:
        t = schedule_timesteps(sigma_schedule, num_steps, T)
        levels = level_at_timestep(schedule, t)
        return _grid_from_levels(levels, levels * T if kind == "flow" else t, kind)
    if sigma_schedule in ALIGN_YOUR_STEPS:
        if kind == "flow":
            raise ValueError(f"sigma_schedule {sigma_schedule!r} holds SD's noise levels; it needs a VP schedule.")
        levels = align_your_steps_levels(ALIGN_YOUR_STEPS[sigma_schedule], num_steps)
        return _grid_from_levels(levels, model_timesteps(schedule, levels), kind)
    if sigma_schedule != "default":
        return _grid_from_sigma_schedule(schedule, num_steps, sigma_schedule, sigma_min)
    t = spaced_timesteps(spacing, num_steps, T, steps_offset)
    _check_descending(t, f"{spacing!r} timesteps")
    if t[-1] < 0 or t[0] > T - 1:  # indexes of the training grid, for flow schedules too
        raise ValueError(f"{spacing!r} timesteps must lie in [0, {T - 1}], got {t[-1].item():g}..{t[0].item():g}: "
                         f"lower steps_offset ({steps_offset}).")
    levels = native_levels(schedule)[t.long()]
    model_t = levels * T if kind == "flow" else t
    return _grid_from_levels(levels, model_t, kind)


def _append_final(alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    return torch.cat([alpha, one]), torch.cat([sigma, zero])


def _check_num_steps(num_steps, num_train_timesteps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}.")
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps ({num_steps}) cannot exceed num_train_timesteps ({num_train_timesteps}): "
            "there are not that many distinct training timesteps. Use fewer steps or custom `sigmas`."
        )


KARRAS_SIGMA_MAX = 80.0  # Karras et al. 2022, Sec. 5: sigma_max = 80 (VE level) suffices for images


def _grid_from_sigma_schedule(
    schedule: NoiseSchedule, num_steps: int, sigma_schedule: str, sigma_min: float | None = None
) -> SamplingGrid:
    """Karras / exponential / linear levels from the training range's top to its bottom (or `sigma_min`).

    The first node is always the schedule's terminal level (where a pipeline's pure noise lives). When
    that level is beyond `KARRAS_SIGMA_MAX` (cosine: ~2e4; zero terminal SNR: inf), spacing the nodes
    from it would spend most steps where nothing changes, so the other N-1 nodes are spaced from
    KARRAS_SIGMA_MAX down instead (diffusers' Karras sigmas fail on the cosine schedule this way).
    """
    if sigma_schedule not in LEVEL_SCHEDULES:
        raise ValueError(f"Unknown sigma_schedule {sigma_schedule!r}; valid values: {', '.join(SIGMA_SCHEDULES)}.")
    level_min, level_max = level_range(schedule)
    if sigma_min is not None:
        if not 0 < sigma_min < level_max:
            raise ValueError(f"sigma_min must lie in (0, {level_max:g}) for this schedule, got {sigma_min}.")
        level_min = sigma_min
    terminal = native_levels(schedule)[-1]
    if schedule.kind == "vp" and terminal > KARRAS_SIGMA_MAX and num_steps > 1:
        rest = LEVEL_SCHEDULES[sigma_schedule](level_min, min(level_max, KARRAS_SIGMA_MAX), num_steps - 1)
        levels = torch.cat([terminal.reshape(1), rest])
    else:
        levels = LEVEL_SCHEDULES[sigma_schedule](level_min, level_max, num_steps)
    timesteps = model_timesteps(schedule, levels)
    return _grid_from_levels(levels, timesteps, schedule.kind)
