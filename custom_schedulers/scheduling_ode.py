"""Euler and Heun on the probability-flow ODE, in a chosen time variable (shared by four named samplers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from . import solvers
from .base import DiffusionSampler, Evaluation, Stage
from .grids import SamplingGrid


@dataclass(frozen=True)
class HeunState:
    """What Heun's corrector needs from its predictor (Karras et al. 2022, Alg. 1): the step's start y = x_i in
    ODE coordinates, its slope d = d_i and the step dt = t_{i+1} - t_i."""

    y: torch.Tensor
    d: torch.Tensor
    dt: float


def require_predictor(state):
    """The predictor's state for a corrector evaluation, or a clear error if the run started mid-step."""
    if state is None:
        raise ValueError(
            "Heun's corrector evaluation came without its predictor: start at an index of `timesteps` that "
            "begins a step (a multiple of `order`, as diffusers' img2img pipelines do)."
        )
    return state


class ProbabilityFlowODESampler(DiffusionSampler):
    """Euler (or Heun, if `heun`) steps of dy/dtau = d in the coordinates `variable`
    ("ve": tau = sigma/alpha, k-diffusion / diffusers Euler; "flow": tau = sigma/(alpha+sigma), rectified flow).

    Rules: `solvers.euler_step` (predictor) and `solvers.heun_step` (the trapezoidal corrector).

    Heun evaluates the model twice per step (Karras et al. 2022, Algorithm 1): `timesteps` interleaves
    each step's start and end exactly like diffusers' Heun schedulers ([t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]),
    so img2img's `timesteps[k * order:]` starts step k as in diffusers. The step into sigma = 0 is a plain Euler
    step (it returns the x_0 estimate). So is a step that shrinks tau more than `min_corrected_ratio`-fold
    (its corrector evaluation keeps the Euler result): in "ve" coordinates the trapezoid weights eps at both
    ends by |dt|/2, and on a step from tau >> data scale down to it (cosine's terminal tau ~2e4, zero terminal
    SNR's tau = inf, 3-step Karras grids) it errs by ~tau/2 times the data scale and diverges (as diffusers'
    Heun does on the cosine schedule), while the Euler step stays within the data scale.
    """

    variable: ClassVar[Literal["ve", "flow"]] = "ve"
    heun: ClassVar[bool] = False
    min_corrected_ratio: ClassVar[float] = 1 / 8  # Gaussian data: Heun beats Euler down to ratios ~1/3

    def _reset_history(self) -> None:
        super()._reset_history()
        self.heun_state: HeunState | None = None

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
            plan.append(Evaluation(i, Stage.PREDICT))
            if self.heun and float(grid.sigma[i + 1]) != 0:
                plan.append(Evaluation(i + 1, Stage.CORRECT))
        return plan

    def _update(self, stage, node, x, denoised, eps, generator):
        if stage is Stage.CORRECT:
            return self._correct(node, x, denoised, eps)
        step = self._step(node)
        alpha, sigma, alpha_next, sigma_next = step.alpha, step.sigma, step.alpha_next, step.sigma_next
        if not math.isfinite(self._tau(self.grid, node)):
            self.heun_state = None
            return solvers.ddim_step(denoised, eps, alpha_next, sigma_next)  # Euler's limit as alpha -> 0 (tau = inf)
        y, tau = solvers.to_ode_coordinates(x, alpha, sigma, self.variable)
        _, tau_next = solvers.to_ode_coordinates(x, alpha_next, sigma_next, self.variable)
        d = solvers.ode_derivative(denoised, eps, self.variable)
        dt = tau_next - tau
        self.heun_state = HeunState(y, d, dt) if self._has_corrector(self.grid, node) else None
        return solvers.from_ode_coordinates(solvers.euler_step(y, d, dt), alpha_next, sigma_next, self.variable)

    def _correct(self, node, x_2, denoised_2, eps_2):
        """Heun's second evaluation at x_2 on node `node` (the step's end); keeps x_2 where no correction applies."""
        if not self._has_corrector(self.grid, node - 1):
            return x_2
        state, self.heun_state = require_predictor(self.heun_state), None
        alpha_next, sigma_next = float(self.grid.alpha[node]), float(self.grid.sigma[node])
        d_2 = solvers.ode_derivative(denoised_2, eps_2, self.variable)
        x_next = solvers.heun_step(state.y, state.d, d_2, state.dt)
        return solvers.from_ode_coordinates(x_next, alpha_next, sigma_next, self.variable)
