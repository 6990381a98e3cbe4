"""Adams-Bashforth multistep samplers on the probability-flow ODE: iPNDM and DEIS (tAB)."""

from __future__ import annotations

from typing import Literal

from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class _AdamsBashforthSampler(DiffusionSampler):
    """y' = y + sum_j w_j d_j in the native level's ODE coordinates (VP: y = x/alpha, tau = sigma/alpha, d = eps,
    as k-diffusion; flow: y = x, tau = s, d = u, as ComfyUI on flow models), d_j the slopes at the last
    `max_order` nodes (newest first, `history`); the subclass chooses the weights w_j (`_weights`).

    The step into sigma = 0 returns the x_0 estimate. A start at alpha = 0 (zero terminal SNR: tau = inf) is a
    DDIM step (Euler's limit there) whose slope, at an infinite node, is left out of later polynomials."""

    def _weights(self, taus: list[float], tau_next: float) -> list[float]:
        raise NotImplementedError

    def _update(self, stage, node, x, denoised, eps, generator):
        # | variable | paper (Zhang & Chen 2023, DEIS, eq. 14) |
        # | tau, taus | t_i, t_{i-j} (noise levels of the nodes) |
        # | history | [(t_{i-j}, eps_theta(x_{t_{i-j}}))] |
        step = self._step(node)
        if step.sigma_next == 0.0:
            return step.alpha_next * denoised
        variable = "flow" if self.schedule.kind == "flow" else "ve"
        if variable == "ve" and step.alpha == 0.0:
            self.history = []
            return solvers.ddim_step(denoised, eps, step.alpha_next, step.sigma_next)
        y, tau = solvers.to_ode_coordinates(x, step.alpha, step.sigma, variable)
        _, tau_next = solvers.to_ode_coordinates(x, step.alpha_next, step.sigma_next, variable)
        d = solvers.ode_derivative(denoised, eps, variable)
        self.history = [(tau, d)] + self.history[: self.config.max_order - 1]
        weights = self._weights([t for t, _ in self.history], tau_next)
        y_next = y + sum(w * d_j for w, (_, d_j) in zip(weights, self.history))
        return solvers.from_ode_coordinates(y_next, step.alpha_next, step.sigma_next, variable)


def _check_order(max_order: int, highest: int) -> None:
    if max_order not in range(1, highest + 1):
        raise ValueError(f"max_order must be 1 to {highest}, got {max_order!r}.")


class IPNDMSampler(_AdamsBashforthSampler):
    """iPNDM: the improved pseudo numerical method, an Adams-Bashforth method in the noise level warm-started at
    lower orders, [Zhang & Chen 2023](https://arxiv.org/abs/2204.13902) Sec. 5 (after PNDM, Liu et al. 2022):
    ComfyUI's `sample_ipndm` ("uniform" weights) and `sample_ipndm_v` ("variable" weights).

    Rules: `solvers.IPNDM_WEIGHTS` or `solvers.adams_bashforth_weights` (no time map), in `_AdamsBashforthSampler`.
    Config (besides the `DiffusionSampler` fields):
        max_order (`1 | 2 | 3 | 4`, 4): the number of slopes combined (ComfyUI's name; not `solver_order`, which
            stock configs carry with their own meaning).
        step_weights (`"uniform" | "variable"`, "uniform"): the constant-step Adams-Bashforth weights (iPNDM; exact
            only on evenly spaced levels) or those of the actual levels (iPNDM-v, order `max_order` on any grid;
            ComfyUI's `sample_ipndm_v` agrees up to order 2, and to order 3 on evenly spaced levels, see
            `tests/test_scheduler_equivalence.py::COMFYUI_OUTPUTS`).
    """

    @register_to_config
    def __init__(self, max_order: Literal[1, 2, 3, 4] = 4, step_weights: Literal["uniform", "variable"] = "uniform",
                 **options):
        _check_order(max_order, 4)
        if step_weights not in ("uniform", "variable"):
            raise ValueError(f"Unknown step_weights {step_weights!r}; valid values: uniform, variable.")
        super().__init__(**options)

    def _weights(self, taus, tau_next):
        if self.config.step_weights == "variable":
            return solvers.adams_bashforth_weights(taus, tau_next)
        return [(tau_next - taus[0]) * w for w in solvers.IPNDM_WEIGHTS[len(taus)]]


class DEISSampler(_AdamsBashforthSampler):
    """DEIS tAB: the exponential integrator whose eps is the Lagrange polynomial in the VP-SDE time t through the
    last `max_order` nodes, integrated exactly, [Zhang & Chen 2023](https://arxiv.org/abs/2204.13902) eq. 14 "tAB":
    ComfyUI's `sample_deis` (`deis_mode="tab"`), with t from `solvers.deis_time` (EDM's VP-SDE fit).
    diffusers' `DEISMultistepScheduler` is another DEIS variant (log-rho, data prediction).

    Rule: `solvers.adams_bashforth_weights` with `solvers.deis_time`, in `_AdamsBashforthSampler`.
    Config (besides the `DiffusionSampler` fields):
        max_order (`1 | 2 | 3 | 4`, 3): the number of eps estimates in the polynomial (ComfyUI's name).
    """

    @register_to_config
    def __init__(self, max_order: Literal[1, 2, 3, 4] = 3, **options):
        _check_order(max_order, 4)
        super().__init__(**options)

    def _weights(self, taus, tau_next):
        return solvers.adams_bashforth_weights(taus, tau_next, solvers.deis_time)
