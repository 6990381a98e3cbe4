"""Noise schedules: training timestep t -> (alpha_t, sigma_t).

Convention, stated once for the whole package:

* ``x_t = alpha_t * x_0 + sigma_t * eps`` on a grid of ``T`` training timesteps
  ``t = 0 .. T-1``; **t = 0 is the cleanest level, t = T-1 the noisiest** (the
  diffusers convention, so ``scheduler.timesteps`` run from high to low).
* Variance-preserving (VP) schedules have ``alpha^2 + sigma^2 = 1`` and are given
  by their betas; ``alpha_bar = alpha^2`` is diffusers' ``alphas_cumprod``.
* Rectified flow has ``alpha = 1 - s`` and ``sigma = s`` with ``s`` in (0, 1]
  (diffusers' FlowMatch convention: ``s = (t + 1) / T``, optionally shifted).
* ``snr = alpha^2 / sigma^2``; ``lambda = log(alpha / sigma) = log_snr / 2``.

Every schedule is built in float64; samplers cast to float32 only for step math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

BetaScheduleName = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid", "flow"]
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid", "flow")


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_t and sigma_t on the training grid (float64, length T), and their kind."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    kind: Literal["vp", "flow"]

    @property
    def num_train_timesteps(self) -> int:
        return self.alpha.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.alpha**2

    @property
    def snr(self) -> torch.Tensor:
        return snr(self.alpha, self.sigma)

    @property
    def log_snr(self) -> torch.Tensor:
        return log_snr(self.alpha, self.sigma)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alpha[-1] == 0)


# ---------------------------------------------------------------- beta schedules


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas (Ho et al. 2020, DDPM, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_train_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's betas: linear in sqrt(beta) (Rombach et al. 2022, LDM configs)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Unnormalised cosine alpha-bar f(t) for continuous t in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine betas, beta_t = 1 - abar(t+1)/abar(t) capped at 0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    abar = cosine_alpha_bar(grid, s)
    return torch.clamp(1 - abar[1:] / abar[:-1], max=max_beta)


def sigmoid_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Sigmoid betas on [-6, 6] (as in diffusers' DDPMScheduler's "sigmoid" beta schedule)."""
    ramp = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64))
    return ramp * (beta_end - beta_start) + beta_start


def betas_to_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def alphas_cumprod_to_betas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Inverse of `betas_to_alphas_cumprod`."""
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so alpha_bar_T = 0 and t=0 is unchanged (Lin et al. 2023, Algorithm 1)."""
    abar_sqrt = betas_to_alphas_cumprod(betas).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    return alphas_cumprod_to_betas(abar)


# ---------------------------------------------------------------- rectified flow


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift sigma' = shift*sigma / (1 + (shift-1)*sigma) (Esser et al. 2024, SD3, Sec. 5.3.2)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_train_timesteps: int, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow noise levels s = (t+1)/T on the training grid, shifted (Liu et al. 2022; SD3)."""
    grid = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift_sigmas(grid, shift)


# ---------------------------------------------------------------- schedules


def vp_schedule(betas: torch.Tensor) -> NoiseSchedule:
    """A VP schedule from betas: alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)."""
    abar = betas_to_alphas_cumprod(betas)
    return NoiseSchedule(alpha=abar.sqrt(), sigma=(1.0 - abar).sqrt(), kind="vp")


def flow_schedule(num_train_timesteps: int, shift: float = 1.0) -> NoiseSchedule:
    """A rectified-flow schedule: alpha = 1 - s, sigma = s."""
    s = flow_sigmas(num_train_timesteps, shift)
    return NoiseSchedule(alpha=1.0 - s, sigma=s, kind="flow")


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> torch.Tensor:
    """Betas for a diffusers `beta_schedule` name ("cosine" is our name for "squaredcos_cap_v2")."""
    if beta_schedule == "linear":
        return linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):
        return cosine_betas(num_train_timesteps)
    if beta_schedule == "sigmoid":
        return sigmoid_betas(num_train_timesteps, beta_start, beta_end)
    raise ValueError(
        f"Unknown beta_schedule {beta_schedule!r}; valid values: {', '.join(BETA_SCHEDULES)}."
    )


def make_schedule(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: list[float] | torch.Tensor | None = None,
    rescale_betas_zero_snr: bool = False,
    shift: float = 1.0,
) -> NoiseSchedule:
    """The schedule a diffusers scheduler config describes (keys named as in diffusers' configs)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
    if beta_schedule == "flow":
        return flow_schedule(num_train_timesteps, shift)
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
    else:
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return vp_schedule(betas)


SCHEDULE_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "trained_betas",
                 "rescale_betas_zero_snr", "shift")


def schedule_from_config(config) -> NoiseSchedule:
    """The schedule a diffusers scheduler config (a mapping, ours or stock) describes: `make_schedule` of its
    `SCHEDULE_KEYS` (missing ones take `make_schedule`'s defaults, as a stock scheduler's would)."""
    if "beta_schedule" not in config:
        raise ValueError(f"the scheduler config has no `beta_schedule`, so its noise schedule is unknown: {dict(config)}")
    return make_schedule(**{key: config[key] for key in SCHEDULE_KEYS if key in config})


# ---------------------------------------------------------------- SNR helpers


def snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2 (Kingma et al. 2021, VDM, eq. 2)."""
    return alpha**2 / sigma**2


def log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha^2 / sigma^2); -inf at zero terminal SNR, +inf where sigma = 0."""
    return 2.0 * (torch.log(alpha) - torch.log(sigma))


def inverse_interpolate(values: torch.Tensor, positions: torch.Tensor, target) -> torch.Tensor:
    """The position where the piecewise-linear curve through (positions[i], values[i]) takes `target`: the inverse
    of linear interpolation. `values` increase; non-finite ones are skipped; targets beyond them clamp to the ends."""
    finite = torch.isfinite(values)
    values_f, positions_f = values[finite], positions[finite]
    clamped = torch.as_tensor(target, dtype=torch.float64).clamp(values_f[0], values_f[-1])
    idx = torch.searchsorted(values_f, clamped).clamp(1, values_f.shape[0] - 1)
    lo, hi = values_f[idx - 1], values_f[idx]
    w = ((clamped - lo) / (hi - lo)).nan_to_num(0.0)
    return positions_f[idx - 1] + w * (positions_f[idx] - positions_f[idx - 1])


def timestep_from_log_snr(schedule: NoiseSchedule, target_log_snr: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep whose log-SNR equals `target_log_snr` (piecewise-linear inverse).

    log-SNR decreases with t; values outside the grid clamp to 0 or T-1.
    """
    T = schedule.num_train_timesteps
    grid = schedule.log_snr.flip(0)  # increasing
    target = torch.as_tensor(target_log_snr, dtype=torch.float64)
    t = inverse_interpolate(grid, torch.arange(T - 1, -1, -1, dtype=torch.float64), target)
    return torch.where(target <= grid[0], torch.full_like(t, T - 1.0), t)


# ---------------------------------------------------------------- analysis


def analyze_schedule(schedule: NoiseSchedule) -> dict:
    """A schedule's key numbers: beta range, final alpha-bar,
    SNR at start and end, log-SNR range and the timestep where SNR is closest to 1."""
    abar = schedule.alphas_cumprod
    betas = alphas_cumprod_to_betas(abar) if schedule.kind == "vp" else None
    s = schedule.snr
    ls = schedule.log_snr
    return {
        "kind": schedule.kind,
        "beta_min": float(betas.min()) if betas is not None else None,
        "beta_max": float(betas.max()) if betas is not None else None,
        "alpha_bar_final": float(abar[-1]),
        "snr_start": float(s[0]),
        "snr_end": float(s[-1]),
        "log_snr_min": float(ls[-1]),
        "log_snr_max": float(ls[0]),
        "snr_one_timestep": int(torch.argmin(ls.abs()).item()),
    }


def named_schedules(num_train_timesteps: int = 1000) -> dict[str, NoiseSchedule]:
    """Every schedule this package offers, under a display name (used by the analysis and the UI)."""
    T = num_train_timesteps
    sd = scaled_linear_betas(T)
    return {
        "linear": vp_schedule(linear_betas(T)),
        "scaled_linear (SD)": vp_schedule(sd),
        "cosine": vp_schedule(cosine_betas(T)),
        "sigmoid": vp_schedule(sigmoid_betas(T)),
        "linear + zero-terminal-SNR": vp_schedule(rescale_zero_terminal_snr(linear_betas(T))),
        "scaled_linear + zero-terminal-SNR": vp_schedule(rescale_zero_terminal_snr(sd)),
        "cosine + zero-terminal-SNR": vp_schedule(rescale_zero_terminal_snr(cosine_betas(T))),
        "rectified flow": flow_schedule(T, 1.0),
        "rectified flow, shift 3": flow_schedule(T, 3.0),
    }


def analyze_schedules(num_train_timesteps: int = 1000) -> dict[str, dict]:
    """`analyze_schedule` for every named schedule."""
    return {name: analyze_schedule(s) for name, s in named_schedules(num_train_timesteps).items()}
