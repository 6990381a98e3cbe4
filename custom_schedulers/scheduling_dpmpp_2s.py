"""Two-stage DPM-Solver++ samplers with a midpoint evaluation: DPM++ 2S a and DPM++ SDE (k-diffusion, A1111)."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from . import grids, solvers
from .base import DiffusionSampler, Evaluation, Stage
from .grids import SamplingGrid


class _MidpointSampler(DiffusionSampler):
    """Two model evaluations per step: at the step's start (PREDICT, which moves to the midpoint) and at the
    midpoint (CORRECT, which takes the step from its start with the midpoint's x_0 estimate). The grid holds
    the midpoints between the nodes, so `timesteps` reads [t_0, m_0, t_1, m_1, ..., t_{N-1}] (the final step into
    sigma = 0 is one evaluation), and img2img's `timesteps[k * order:]` starts step k, as for diffusers' KDPM2.

    The noise comes from the `generator` passed to `step`, drawn in k-diffusion's order (a per-image list of
    generators keeps every image's noise a function of its own seed, whatever the batch)."""

    order = 2

    @register_to_config
    def __init__(self, eta: float = 1.0, **options):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = no fresh noise), got {eta}.")
        super().__init__(**options)

    def _reset_history(self) -> None:
        super()._reset_history()
        self.step_start: tuple[torch.Tensor, int] | None = None  # (x at the step's start, its node)

    def _midpoint_tau(self, tau: float, tau_next: float) -> float:
        raise NotImplementedError

    def _evaluation_grid(self, grid: SamplingGrid) -> SamplingGrid:
        """The grid with each non-final step's midpoint inserted after its start."""
        kind, alpha, sigma, timesteps = self.schedule.kind, [], [], []
        for i in range(grid.num_steps):
            alpha.append(grid.alpha[i]), sigma.append(grid.sigma[i]), timesteps.append(grid.timesteps[i])
            if float(grid.sigma[i + 1]) == 0.0:
                continue
            tau_mid = self._midpoint_tau(*(solvers.ve_level(float(grid.alpha[k]), float(grid.sigma[k])) for k in (i, i + 1)))
            a_mid, s_mid = solvers.ve_to_alpha_sigma(tau_mid, kind)
            alpha.append(torch.tensor(a_mid, dtype=torch.float64)), sigma.append(torch.tensor(s_mid, dtype=torch.float64))
            level = torch.tensor([s_mid if kind == "flow" else tau_mid], dtype=torch.float64)
            timesteps.append(grids.model_timesteps(self.schedule, level)[0])
        return SamplingGrid(torch.stack(timesteps), torch.stack([*alpha, grid.alpha[-1]]),
                            torch.stack([*sigma, grid.sigma[-1]]))

    def _make_plan(self, grid):
        # Every step but the last has a midpoint, so the nodes alternate: start, midpoint, start, ..., last start.
        return [Evaluation(i, Stage.CORRECT if i % 2 else Stage.PREDICT) for i in range(grid.num_steps)]

    def _levels(self, node: int) -> tuple[float, float, float, float]:
        """(alpha, sigma) at this step's start `node` and at its end (the node after its midpoint)."""
        g = self.grid
        end = node + 1 if node == g.num_steps - 1 else node + 2
        return float(g.alpha[node]), float(g.sigma[node]), float(g.alpha[end]), float(g.sigma[end])

    def _first_order(self, x, denoised, alpha, sigma, tau_to: float) -> tuple[torch.Tensor, float]:
        """DPM-Solver++ 1 (= DDIM) from (alpha, sigma) to VE level tau_to: (x there in VP coordinates, its alpha)."""
        a_to, s_to = solvers.ve_to_alpha_sigma(tau_to, "vp")
        return solvers.dpmpp_1_step(x, denoised, solvers.Step.between(alpha, sigma, a_to, s_to)), a_to


class DPMSolverPlusPlus2SAncestralSampler(_MidpointSampler):
    """DPM++ 2S a: each step to tau_down is a single-step second-order DPM-Solver++ (2S: the midpoint at half the
    log-SNR step), then fresh noise of std tau_up (tau_down^2 + tau_up^2 = tau_next^2): k-diffusion's
    `sample_dpmpp_2s_ancestral` ([Lu et al. 2022b](https://arxiv.org/abs/2211.01095) Alg. 1, r = 1/2).

    Rules: `solvers.ancestral_levels`, `solvers.dpmpp_1_step` (both stages), `solvers.renoise`.
    Config (besides the `DiffusionSampler` fields): eta (`float`, 1.0): the share of the posterior's noise.
    An infinite start level (zero terminal SNR) has no log-SNR midpoint: the midpoint is 2 tau_down there (tau_next
    if tau_down = 0, as with eta = 1: the step is then x_0 at the midpoint re-noised to tau_next).
    """

    def _midpoint_tau(self, tau, tau_next):
        tau_down, _ = solvers.ancestral_levels(tau, tau_next, self.config.eta)
        if math.isinf(tau):
            return 2.0 * tau_down if tau_down > 0 else tau_next
        return math.sqrt(tau * tau_down)

    def _update(self, stage, node, x, denoised, eps, generator):
        if stage is Stage.PREDICT:
            if node == self.grid.num_steps - 1:  # the final step: Euler into sigma = 0 returns the x_0 estimate
                return float(self.grid.alpha[-1]) * denoised
            self.step_start = (x, node)
            return solvers.dpmpp_1_step(x, denoised, self._step(node))  # to the midpoint, the next grid node
        x_start, start = self.step_start
        alpha, sigma, alpha_end, sigma_end = self._levels(start)
        tau, tau_next = solvers.ve_level(alpha, sigma), solvers.ve_level(alpha_end, sigma_end)
        tau_down, tau_up = solvers.ancestral_levels(tau, tau_next, self.config.eta)
        x_down, alpha_down = self._first_order(x_start, denoised, alpha, sigma, tau_down)
        return solvers.renoise(x_down, alpha_down, alpha_end, tau_up, self._noise_like(x, generator))


class DPMSolverPlusPlusSinglestepSDESampler(_MidpointSampler):
    """DPM++ SDE: a stochastic single-step DPM-Solver++ with the midpoint at half the log-SNR step, both stages
    ancestral (deterministic to tau_down, fresh noise up to the target level): k-diffusion's `sample_dpmpp_sde`
    (r = 1/2; its Brownian-tree noise replaced by independent draws from the step's generator), A1111's
    "DPM++ SDE", diffusers' `DPMSolverSDEScheduler` ([Lu et al. 2022b](https://arxiv.org/abs/2211.01095)).

    Rules: `solvers.ancestral_levels`, `solvers.dpmpp_1_step`, `solvers.renoise`.
    Config (besides the `DiffusionSampler` fields): eta (`float`, 1.0): the share of the posterior's noise.
    """

    def _midpoint_tau(self, tau, tau_next):
        return 2.0 * tau_next if math.isinf(tau) else math.sqrt(tau * tau_next)

    def _ancestral_stage(self, x_start, denoised, start: int, alpha_to: float, sigma_to: float, generator):
        """From the step's start to (alpha_to, sigma_to): first order to tau_down with `denoised`, then noise."""
        alpha, sigma = float(self.grid.alpha[start]), float(self.grid.sigma[start])
        tau, tau_to = solvers.ve_level(alpha, sigma), solvers.ve_level(alpha_to, sigma_to)
        tau_down, tau_up = solvers.ancestral_levels(tau, tau_to, self.config.eta)
        x_down, alpha_down = self._first_order(x_start, denoised, alpha, sigma, tau_down)
        return solvers.renoise(x_down, alpha_down, alpha_to, tau_up, self._noise_like(x_start, generator))

    def _update(self, stage, node, x, denoised, eps, generator):
        if stage is Stage.PREDICT:
            if node == self.grid.num_steps - 1:  # the final step: Euler into sigma = 0 returns the x_0 estimate
                return float(self.grid.alpha[-1]) * denoised
            self.step_start = (x, node)
            alpha_mid, sigma_mid = float(self.grid.alpha[node + 1]), float(self.grid.sigma[node + 1])
            return self._ancestral_stage(x, denoised, node, alpha_mid, sigma_mid, generator)
        x_start, start = self.step_start
        _, _, alpha_end, sigma_end = self._levels(start)
        return self._ancestral_stage(x_start, denoised, start, alpha_end, sigma_end, generator)
