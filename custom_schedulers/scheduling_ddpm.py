"""DDPM: ancestral sampling from the forward process posterior (Ho et al. 2020)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class DDPMSampler(DiffusionSampler):
    """Ancestral DDPM sampler, [Ho et al. 2020](https://arxiv.org/abs/2006.11239), "fixed_small" variance.

    Rule: `solvers.ddpm_step`. Matches diffusers' `DDPMScheduler` (variance_type "fixed_small") on the same grid and noise.
    Config: the `DiffusionSampler` fields only.
    """

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)

    def _update(self, stage, node, x, denoised, eps, generator):
        # x_{t-1} ~ q(x_{t-1} | x_t, x_0), Ho et al. 2020 eqs. 6-7, with x_0 from the model.
        step = self._step(node)
        noise = self._noise_like(x, generator) if step.sigma_next > 0 else None
        return solvers.ddpm_step(x, denoised, step, noise)
