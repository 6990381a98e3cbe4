"""ER-SDE-Solver: the extended reverse-time SDE family, VP form, up to three stages (Cui et al. 2023)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class ERSDESampler(DiffusionSampler):
    """ER-SDE-Solver-3, [Cui et al. 2023](https://arxiv.org/abs/2309.06169): ComfyUI's `sample_er_sde`. Each step
    takes x_0 and its first and second divided differences in tau = sigma/alpha over the last three nodes.

    Rule: `solvers.er_sde_step`. The noise comes from the `generator` passed to `step` (a list of per-image
    generators keeps every image's noise a function of its own seed). A start at alpha = 0 (zero terminal SNR;
    s = 1 on a flow schedule) is the step's limit tau -> inf (x' = alpha' x_0 + sigma' z for the default noise
    scale; ComfyUI starts from a finite level instead), and differences across that node are zero.
    Config (besides the `DiffusionSampler` fields):
        max_stage (`1 | 2 | 3`, 3): the number of Taylor terms of x_0.
        noise_scale (`"er-sde" | "ode" | "reverse-sde"`, "er-sde"): the paper's noise-scale function phi(tau):
            tau (e^{tau^0.3} + 10) (their choice), tau (the probability-flow ODE, no noise) or tau^2 (the reverse SDE).
    """

    @register_to_config
    def __init__(self, max_stage: Literal[1, 2, 3] = 3,
                 noise_scale: Literal["er-sde", "ode", "reverse-sde"] = "er-sde", **options):
        if max_stage not in (1, 2, 3):
            raise ValueError(f"max_stage must be 1, 2 or 3, got {max_stage!r}.")
        if noise_scale not in ("er-sde", "ode", "reverse-sde"):
            raise ValueError(f"Unknown noise_scale {noise_scale!r}; valid values: er-sde, ode, reverse-sde.")
        super().__init__(**options)

    def _reset_history(self) -> None:
        super()._reset_history()
        self.last_slope: torch.Tensor | None = None  # dx_0/dtau at the previous step (ComfyUI's old_denoised_d)

    def _update(self, stage, node, x, denoised, eps, generator):
        step = self._step(node)
        tau = solvers.ve_level(step.alpha, step.sigma)
        derivatives = [denoised]
        if self.history and self.config.max_stage >= 2:
            tau_old, denoised_old = self.history[0]
            slope = (denoised - denoised_old) / (tau - tau_old) if math.isfinite(tau_old) else torch.zeros_like(x)
            if len(self.history) > 1 and self.config.max_stage >= 3:
                tau_old2 = self.history[1][0]
                curvature = ((slope - self.last_slope) / ((tau - tau_old2) / 2) if math.isfinite(tau_old2)
                             else torch.zeros_like(x))
                derivatives.append(slope), derivatives.append(curvature)
            else:
                derivatives.append(slope)
            self.last_slope = slope
        self.history = [(tau, denoised)] + self.history[:1]
        if step.sigma_next == 0.0:
            return step.alpha_next * denoised
        noise = self._noise_like(x, generator) if self.config.noise_scale != "ode" else None
        return solvers.er_sde_step(x, derivatives, step, noise, self.config.noise_scale)
