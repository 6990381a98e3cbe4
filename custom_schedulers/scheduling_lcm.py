"""Multistep consistency sampling (Song et al. 2023), LCM-style (Luo et al. 2023)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class LCMSampler(DiffusionSampler):
    """Multistep consistency sampler, [Song et al. 2023](https://arxiv.org/abs/2303.01469) Alg. 1, with the LCM
    boundary condition, [Luo et al. 2023](https://arxiv.org/abs/2310.04378): x_0 = c_skip x + c_out x_theta,
    then re-noise x_0 to the next node with fresh noise (diffusers' `LCMScheduler` on the same grid).

    Config (besides the `DiffusionSampler` fields):
        timestep_scaling (`float`, 10.0): t in c_skip(t), c_out(t) is timestep * timestep_scaling.
    """

    @register_to_config
    def __init__(self, timestep_scaling: float = 10.0, **options):
        super().__init__(**options)

    def denoise(self, model_output, x, node):
        denoised, eps = super().denoise(model_output, x, node)
        c_skip, c_out = solvers.consistency_boundary(float(self.grid.timesteps[node]), self.config.timestep_scaling)
        return c_out * denoised + c_skip * x, eps

    def _update(self, stage, node, x, denoised, eps, generator):
        _, _, alpha_next, sigma_next = self._node(node)
        noise = self._noise_like(x, generator) if sigma_next > 0 else None
        return solvers.consistency_step(denoised, alpha_next, sigma_next, noise)
