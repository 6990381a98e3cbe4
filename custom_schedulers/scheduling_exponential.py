"""ComfyUI's exponential-integrator samplers in data prediction and log-SNR: res_multistep and exp_heun_2_x0."""

from __future__ import annotations

import math

from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import Stage
from .scheduling_dpmpp import _DPMSolverPlusPlusBase
from .scheduling_ode import ProbabilityFlowODESampler, require_predictor


class ResMultistepSampler(_DPMSolverPlusPlusBase):
    """RES multistep: the second-order exponential integrator with x_0 linear in lambda through the last two
    estimates, integrated exactly (the phi_2 weight; DPM++ 2M uses its small-step value 1/2 instead),
    [Zhang et al. 2023](https://arxiv.org/abs/2308.02157) "RES": ComfyUI's `sample_res_multistep`.

    Rules: `solvers.taylor_derivatives` + `solvers.exponential_taylor_step` (first order on the first step, into
    sigma = 0 and across an infinite log-SNR step such as a zero-terminal-SNR start).
    Config: the `DiffusionSampler` fields only.
    """

    max_order = 2

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)

    def _update(self, stage, node, x, denoised, eps, generator):
        step = self._step(node)
        self._remember(denoised)
        hs = self._step_sizes(node)
        if step.sigma_next == 0.0 or len(self.history) < 2 or not math.isfinite(hs[1]):
            return solvers.dpmpp_1_step(x, denoised, step)
        derivatives = solvers.taylor_derivatives([0.0, -hs[1]], self.history[:2])
        return solvers.exponential_taylor_step(x, derivatives, step)


class ExponentialHeunSampler(ProbabilityFlowODESampler):
    """Exponential Heun in data prediction: a DDIM predictor to the step's end, then the step redone with x_0 linear
    in lambda between the two estimates (ComfyUI's `sample_exp_heun_2_x0`, SEEDS-2 with r = 1 and no noise,
    [Gonzalez et al. 2023](https://arxiv.org/abs/2305.14267)). Two model evaluations per step, laid out as Heun's
    (`timesteps` = [t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]; the step into sigma = 0 is one evaluation). Unlike Heun's
    trapezoid in sigma/alpha it stays exact for linear x_0 on any step, also from alpha = 0 (h = inf).

    Rules: `solvers.dpmpp_1_step` (predictor), `solvers.exponential_heun_step` (corrector).
    Config: the `DiffusionSampler` fields only.
    """

    order = 2
    heun = True

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)

    def _has_corrector(self, grid, node):
        return float(grid.sigma[node + 1]) != 0

    def _update(self, stage, node, x, denoised, eps, generator):
        if stage is Stage.CORRECT:
            x_start, denoised_start, start = require_predictor(self.heun_state)
            self.heun_state = None
            return solvers.exponential_heun_step(x_start, denoised_start, denoised, self._step(start))
        step = self._step(node)
        if step.sigma_next == 0.0:
            return step.alpha_next * denoised
        self.heun_state = (x, denoised, node)
        return solvers.dpmpp_1_step(x, denoised, step)
