"""DDIM: denoising diffusion implicit models, eta in [0, 1] (Song et al. 2021)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class DDIMSampler(DiffusionSampler):
    """DDIM, [Song et al. 2021](https://arxiv.org/abs/2010.02502).

    Config (besides the `DiffusionSampler` fields):
        eta (`float`, 0.0): weight of the fresh noise, eq. 16; 0 is the deterministic DDIM ODE step,
            1 is DDPM's ancestral step. Unlike diffusers' DDIM, eta is a config field, not a `step` argument.

    The previous timestep is the next node of the actual grid (never t - T/N), and the last step
    goes to sigma = 0 (diffusers' `set_alpha_to_one=True`).
    """

    @register_to_config
    def __init__(self, eta: float = 0.0, **options):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM), got {eta}.")
        super().__init__(**options)

    def _update(self, stage, node, x, denoised, eps, generator):
        # | variable | paper (Song et al. 2021, eq. 12) |
        # | alpha_next, sigma_next | sqrt(alpha_{t-1}), sqrt(1 - alpha_{t-1}) |
        # | c_noise | sigma_t(eta), eq. 16 |
        alpha, sigma, alpha_next, sigma_next = self._node(node)
        c_noise = solvers.ddim_noise_std(alpha, sigma, alpha_next, sigma_next, self.config.eta)
        noise = self._noise_like(x, generator) if c_noise > 0 else None
        return solvers.ddim_step(denoised, eps, alpha_next, sigma_next, c_noise, noise)
