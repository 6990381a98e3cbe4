"""Euler and Heun on the probability-flow ODE, in a chosen time variable (shared by four named samplers)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from . import solvers
from .base import DiffusionSampler
from .grids import SamplingGrid


class ProbabilityFlowODESampler(DiffusionSampler):
    """Euler (or Heun, if `heun`) steps of dy/dtau = d in the coordinates `variable`
    ("ve": tau = sigma/alpha, k-diffusion / diffusers Euler; "flow": tau = sigma/(alpha+sigma), rectified flow).

    Heun evaluates the model twice per step (Karras et al. 2022, Algorithm 1): `timesteps` interleaves
    each step's start and end, like diffusers' Heun schedulers. The step into sigma = 0 is a plain Euler
    step (it returns the x_0 estimate). So is a step that shrinks tau more than `min_corrected_ratio`-fold:
    in "ve" coordinates the trapezoid weights eps at both ends by |dt|/2, and on a step from tau >> data
    scale down to it (cosine's terminal tau ~2e4, zero terminal SNR's tau = inf, 3-step Karras grids)
    it errs by ~tau/2 times the data scale and diverges (as diffusers' Heun does on the cosine schedule),
    while the Euler step stays within the data scale.
    """

    variable: ClassVar[Literal["ve", "flow"]] = "ve"
    heun: ClassVar[bool] = False
    min_corrected_ratio: ClassVar[float] = 1 / 8  # Gaussian data: Heun beats Euler down to ratios ~1/3

    def _has_corrector(self, grid: SamplingGrid, node: int) -> bool:
        if not self.heun or float(grid.sigma[node + 1]) == 0:
            return False
        tau, tau_next = self._tau(grid, node), self._tau(grid, node + 1)
        return math.isfinite(tau) and tau_next >= self.min_corrected_ratio * tau

    def _tau(self, grid: SamplingGrid, node: int) -> float:
        alpha, sigma = float(grid.alpha[node]), float(grid.sigma[node])
        if self.variable == "ve":
            return sigma / alpha if alpha > 0 else math.inf
        return sigma / (alpha + sigma)

    def _make_plan(self, grid):
        plan = []
        for i in range(grid.num_steps):
            plan.append((i, "predict"))
            if self._has_corrector(grid, i):
                plan.append((i + 1, "correct"))
        return plan

    def _update(self, stage, node, x, denoised, eps, generator):
        if stage == "correct":
            return self._correct(node, x, denoised, eps)
        alpha, sigma, alpha_next, sigma_next = self._node(node)
        if not math.isfinite(self._tau(self.grid, node)):
            return solvers.ddim_step(denoised, eps, alpha_next, sigma_next)  # Euler's limit as alpha -> 0 (tau = inf)
        y, tau = solvers.to_ode_coordinates(x, alpha, sigma, self.variable)
        _, tau_next = solvers.to_ode_coordinates(x, alpha_next, sigma_next, self.variable)
        d = solvers.ode_derivative(denoised, eps, self.variable)
        dt = tau_next - tau
        if self._has_corrector(self.grid, node):
            self.history = [(y, d, dt)]  # the state the corrector needs (x_i, d_i, dt in Karras Alg. 1)
        return solvers.from_ode_coordinates(solvers.euler_step(y, d, dt), alpha_next, sigma_next, self.variable)

    def _correct(self, node, x_2, denoised_2, eps_2):
        """Heun's second evaluation at x_2 on node `node` (the step's end)."""
        if not self.history:
            raise ValueError(
                "Heun's corrector evaluation came without its predictor: start at an index of `timesteps` that "
                "begins a step (a multiple of `order`, as diffusers' img2img pipelines do)."
            )
        (y, d, dt), = self.history
        alpha_next, sigma_next = float(self.grid.alpha[node]), float(self.grid.sigma[node])
        d_2 = solvers.ode_derivative(denoised_2, eps_2, self.variable)
        self.history = []
        return solvers.from_ode_coordinates(solvers.heun_step(y, d, d_2, dt), alpha_next, sigma_next, self.variable)
