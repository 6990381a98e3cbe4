"""DPM-Solver++ multistep, orders 1-3, and its SDE variant (Lu et al. 2022b)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class _DPMSolverPlusPlusBase(DiffusionSampler):
    """History of x_0 estimates (newest first) and the usable order at each step."""

    max_order = 3
    flow_grid = "flow-match-multistep"

    def _remember(self, denoised) -> None:
        self.history = [denoised] + self.history[: self.max_order - 1]

    def _step_sizes(self, node: int) -> list[float]:
        """[h, h_last, h_last2, ...]: log-SNR steps ending at node + 1, newest first."""
        lambdas = self.grid.lambdas
        return [float(lambdas[i + 1] - lambdas[i]) for i in range(node, max(node - self.max_order, -1), -1)]

    def _denoised_at_zero(self, node: int):
        """The final step into sigma = 0: the x_0 estimates extrapolated linearly in rho^2 = (sigma/alpha)^2 to
        rho = 0, since along the ODE x_0(rho) = x(0) + O(rho^2) (Tweedie: D(x; rho) = x + rho^2 grad log p)."""
        g = self.grid
        rho, rho_last = float(g.sigma[node] / g.alpha[node]), float(g.sigma[node - 1] / g.alpha[node - 1])
        if not math.isfinite(rho_last):
            return self.history[0]
        w = rho**2 / (rho_last**2 - rho**2)
        return self.history[0] + w * (self.history[0] - self.history[1])

    def _usable_order(self, node: int, hs: list[float]) -> int:
        """min(solver_order, x_0 estimates available); first order into sigma = 0 (DPM-Solver++ 'lower order
        final') and across an infinite log-SNR step (a zero-terminal-SNR start)."""
        if float(self.grid.sigma[node + 1]) == 0.0:
            return 1
        order = min(self.config.solver_order, len(self.history))
        finite = 1
        while finite < order and math.isfinite(hs[finite]):
            finite += 1
        return finite


class DPMSolverPlusPlusSampler(_DPMSolverPlusPlusBase):
    """Multistep DPM-Solver++ in lambda = log(alpha/sigma), [Lu et al. 2022b](https://arxiv.org/abs/2211.01095).

    Rules: `solvers.dpmpp_1_step`, `dpmpp_2m_step`, `dpmpp_3m_step`; the corrector `solvers.taylor_derivatives` +
    `exponential_taylor_step`. Works for VP and rectified-flow schedules alike (only alpha and sigma enter).
    (`history` keeps up to 4 x_0 estimates: the corrector of a 3M step uses four.)
    Config (besides the `DiffusionSampler` fields):
        solver_order (`1 | 2 | 3`, 2): 2 is "DPM++ 2M", 3 is "DPM++ 3M".
        final_step (`"denoise" | "extrapolate"`, "denoise"): the step into sigma = 0 returns the last x_0
            estimate ("denoise", as diffusers and k-diffusion), or the last two extrapolated to sigma = 0
            ("extrapolate", see `_denoised_at_zero`; exact up to O(rho^4) instead of O(rho^2)).
        corrector (`"none" | "adams-moulton"`, "none"): after each model evaluation, redo the step that led
            there with the new x_0 estimate included in the polynomial (an exponential Adams-Moulton corrector,
            the idea of UniC, [Zhao et al. 2023](https://arxiv.org/abs/2302.04867)): one order higher, no extra
            model evaluation (the model output at the uncorrected sample is reused, as UniPC does).
    """

    max_order = 4

    @register_to_config
    def __init__(
        self,
        solver_order: Literal[1, 2, 3] = 2,
        final_step: Literal["denoise", "extrapolate"] = "denoise",
        corrector: Literal["none", "adams-moulton"] = "none",
        **options,
    ):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        if final_step not in ("denoise", "extrapolate"):
            raise ValueError(f"Unknown final_step {final_step!r}; valid values: denoise, extrapolate.")
        if corrector not in ("none", "adams-moulton"):
            raise ValueError(f"Unknown corrector {corrector!r}; valid values: none, adams-moulton.")
        super().__init__(**options)

    def _reset_history(self) -> None:
        super()._reset_history()
        self.step_start: torch.Tensor | None = None  # x at the previous node, for the corrector

    def _corrected(self, node: int, x: torch.Tensor) -> torch.Tensor:
        """x at `node` recomputed from the previous node with the polynomial through the x_0 estimates at
        `node` and up to `solver_order` nodes before it (finite log-SNR only)."""
        lambdas = self.grid.lambdas
        start = node - 1
        if self.step_start is None or not math.isfinite(float(lambdas[start])):
            return x
        points = [k for k in range(min(self.config.solver_order + 1, len(self.history)))
                  if math.isfinite(float(lambdas[node - k]))]
        offsets = [float(lambdas[node - k] - lambdas[start]) for k in points]
        derivatives = solvers.taylor_derivatives(offsets, [self.history[k] for k in points])
        return solvers.exponential_taylor_step(self.step_start, derivatives, self._step(start))

    def _update(self, stage, node, x, denoised, eps, generator):
        # | variable | paper (Lu et al. 2022b, Alg. 2) |
        # | h, h_last | h_i = lambda_{t_i} - lambda_{t_{i-1}}, h_{i-1} |
        # | history | x_theta(x_{t_{i-1}}), x_theta(x_{t_{i-2}}), ... |
        step = self._step(node)
        self._remember(denoised)
        if self.config.corrector == "adams-moulton":
            x = self._corrected(node, x)
            self.step_start = x
        if step.sigma_next == 0.0 and self.config.final_step == "extrapolate" and len(self.history) > 1:
            return step.alpha_next * self._denoised_at_zero(node)
        hs = self._step_sizes(node)
        order = self._usable_order(node, hs)
        if order == 1:
            return solvers.dpmpp_1_step(x, denoised, step)
        if order == 2:
            return solvers.dpmpp_2m_step(x, denoised, self.history[1], step, h_last=hs[1])
        return solvers.dpmpp_3m_step(x, self.history[:3], step, h_last=hs[1], h_last2=hs[2])


class DPMSolverPlusPlusSDESampler(_DPMSolverPlusPlusBase):
    """SDE-DPM-Solver++ (1 or 2M), [Lu et al. 2022b](https://arxiv.org/abs/2211.01095) App. D:
    diffusers' `algorithm_type="sde-dpmsolver++"`, k-diffusion's `sample_dpmpp_2m_sde` (midpoint, eta 1).
    Rule: `solvers.dpmpp_sde_step`.

    Config (besides the `DiffusionSampler` fields):
        solver_order (`1 | 2`, 2).
    """

    max_order = 2

    @register_to_config
    def __init__(self, solver_order: Literal[1, 2] = 2, **options):
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2 for the SDE solver, got {solver_order!r}.")
        super().__init__(**options)

    def _update(self, stage, node, x, denoised, eps, generator):
        step = self._step(node)
        self._remember(denoised)
        hs = self._step_sizes(node)
        order = self._usable_order(node, hs)
        noise = self._noise_like(x, generator)
        h_last = hs[1] if order == 2 else None
        return solvers.dpmpp_sde_step(x, self.history[:order], step, noise, h_last=h_last)


class DPMSolverPlusPlus3MSDESampler(_DPMSolverPlusPlusBase):
    """DPM++ 3M SDE: SDE-DPM-Solver++ with up to three x_0 estimates, [Lu et al. 2022b](https://arxiv.org/abs/2211.01095)
    App. D: k-diffusion's `sample_dpmpp_3m_sde` (its Brownian-tree noise replaced by draws from the step's
    generator, so each image's noise depends only on its own seed), A1111's "DPM++ 3M SDE".

    Rule: `solvers.dpmpp_3m_sde_step`.
    Config (besides the `DiffusionSampler` fields):
        solver_order (`1 | 2 | 3`, 3), eta (`float`, 1.0): the noise share (0 is the ODE, an exponential 3M).
    """

    @register_to_config
    def __init__(self, solver_order: Literal[1, 2, 3] = 3, eta: float = 1.0, **options):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = no fresh noise), got {eta}.")
        super().__init__(**options)

    def _update(self, stage, node, x, denoised, eps, generator):
        step = self._step(node)
        self._remember(denoised)
        if step.sigma_next == 0.0:  # the denoising step
            return step.alpha_next * denoised
        hs = self._step_sizes(node)
        order = self._usable_order(node, hs)
        noise = self._noise_like(x, generator) if self.config.eta > 0 else None
        h_last, h_last2 = (hs + [None, None])[1:3]
        return solvers.dpmpp_3m_sde_step(x, self.history[:order], step, self.config.eta, noise,
                                         h_last=h_last, h_last2=h_last2)
