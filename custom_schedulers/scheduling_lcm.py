"""Multistep consistency sampling (Song et al. 2023), LCM-style (Luo et al. 2023)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from . import grids, solvers
from .base import DiffusionSampler


class LCMSampler(DiffusionSampler):
    """Multistep consistency sampler, [Song et al. 2023](https://arxiv.org/abs/2303.01469) Alg. 1, with the LCM
    boundary condition, [Luo et al. 2023](https://arxiv.org/abs/2310.04378): x_0 = c_skip x + c_out x_theta,
    then re-noise x_0 to the next node with fresh noise (diffusers' `LCMScheduler` on the same grid).
    Rules: `solvers.consistency_boundary`, `solvers.consistency_step`.

    Config (besides the `DiffusionSampler` fields):
        timestep_scaling (`float`, 10.0): t in c_skip(t), c_out(t) is timestep * timestep_scaling.
        original_inference_steps (`int | None`, 50): the DDIM grid the model was distilled on; a step count
            picks its nodes evenly, as diffusers' `LCMScheduler` does (`timestep_spacing` is then unused).
            None: space the steps by `timestep_spacing` like the other samplers.
    """

    @register_to_config
    def __init__(self, timestep_scaling: float = 10.0, original_inference_steps: int | None = 50, **options):
        super().__init__(**options)
        if original_inference_steps is not None and original_inference_steps < 1:
            raise ValueError(f"original_inference_steps must be >= 1 or None, got {original_inference_steps}.")

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None) -> None:
        original = self.config.original_inference_steps
        if original is not None and num_inference_steps is not None and timesteps is None and sigmas is None:
            timesteps = grids.lcm_timesteps(num_inference_steps, original, self.config.num_train_timesteps)
            num_inference_steps = None
        super().set_timesteps(num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)

    def denoise(self, model_output, x, node):
        denoised, eps = super().denoise(model_output, x, node)
        c_skip, c_out = solvers.consistency_boundary(float(self.grid.timesteps[node]), self.config.timestep_scaling)
        return c_out * denoised + c_skip * x, eps

    def _update(self, stage, node, x, denoised, eps, generator):
        step = self._step(node)
        noise = self._noise_like(x, generator) if step.sigma_next > 0 else None
        return solvers.consistency_step(denoised, step, noise)
