"""UniPC: the unified predictor-corrector, orders 1-3, B(h) variants bh1 and bh2 (Zhao et al. 2023)."""

from __future__ import annotations

import math
from typing import Literal

from diffusers.configuration_utils import register_to_config

from . import solvers
from .scheduling_dpmpp import _DPMSolverPlusPlusBase

_OTHER_SOLVER_TYPES = ("midpoint", "heun", "logrho")  # DPMSolverMultistep's and DEIS's solver_type values


class UniPCSampler(_DPMSolverPlusPlusBase):
    """UniPC, [Zhao et al. 2023](https://arxiv.org/abs/2302.04867): the UniP multistep predictor and, after each
    model evaluation, the UniC corrector that refits the step just taken with the new x_0 estimate (no extra
    model evaluation). diffusers' `UniPCMultistepScheduler` (data prediction, `lower_order_final`).

    Rule: `solvers.unipc_step` (predictor, and corrector with `denoised_next`).
    Config (besides the `DiffusionSampler` fields):
        solver_order (`1 | 2 | 3`, 2): the predictor's order (the corrector's is one higher).
        solver_type (`"bh1" | "bh2"`, "bh2"): B(h) = h (bh1, recommended for few steps unconditional) or
            e^h - 1 (bh2, for guided sampling). Another solver's value from a stock config ("midpoint", "heun",
            "logrho") becomes "bh2", as in diffusers' UniPC.
        final_step (`"denoise" | "extrapolate"`, "denoise"): as `DPMSolverPlusPlusSampler`'s (the last two x_0
            estimates extrapolated to sigma = 0).
    """

    max_order = 3

    @register_to_config
    def __init__(self, solver_order: Literal[1, 2, 3] = 2, solver_type: Literal["bh1", "bh2"] = "bh2",
                 final_step: Literal["denoise", "extrapolate"] = "denoise", **options):
        if final_step not in ("denoise", "extrapolate"):
            raise ValueError(f"Unknown final_step {final_step!r}; valid values: denoise, extrapolate.")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        if solver_type not in ("bh1", "bh2", *_OTHER_SOLVER_TYPES):
            raise ValueError(f"Unknown solver_type {solver_type!r}; valid values: bh1, bh2.")
        super().__init__(**options)
        if solver_type in _OTHER_SOLVER_TYPES:  # a stock DPM-Solver/DEIS config's value: bh2, as diffusers' UniPC
            self.register_to_config(solver_type="bh2")

    def _reset_history(self) -> None:
        super()._reset_history()
        self.last_sample, self.last_order = None, 0  # the predictor's start and order, for the corrector

    def _order(self, node: int, available: int) -> int:
        """min(solver_order, estimates available, steps left), lower across an infinite log-SNR (alpha = 0)."""
        lambdas = self.grid.lambdas
        order = min(self.config.solver_order, available, self.grid.num_steps - node)
        while order > 1 and not math.isfinite(float(lambdas[node - order + 1])):
            order -= 1
        return order

    def _rks(self, start: int, order: int, h: float) -> list[float]:
        lambdas = self.grid.lambdas
        return [float(lambdas[start - i] - lambdas[start]) / h for i in range(1, order)]

    def _update(self, stage, node, x, denoised, eps, generator):
        variant = self.config.solver_type
        if self.last_sample is not None and math.isfinite(float(self.grid.lambdas[node - 1])):
            step = self._step(node - 1)  # UniC: redo the last step with the estimate at its end included
            rks = self._rks(node - 1, self.last_order, step.h)
            x = solvers.unipc_step(self.last_sample, self.history[: self.last_order], rks, step, variant, denoised)
        self._remember(denoised)
        step = self._step(node)
        if step.sigma_next == 0.0 and self.config.final_step == "extrapolate" and len(self.history) > 1:
            return step.alpha_next * self._denoised_at_zero(node)
        order = self._order(node, len(self.history))
        self.last_sample, self.last_order = x, order
        return solvers.unipc_step(x, self.history[:order], self._rks(node, order, step.h), step, variant)
