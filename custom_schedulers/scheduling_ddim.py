"""DDIM: denoising diffusion implicit models, eta in [0, 1] (Song et al. 2021)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class DDIMSampler(DiffusionSampler):
    """DDIM, [Song et al. 2021](https://arxiv.org/abs/2010.02502).

    Config (besides the `DiffusionSampler` fields):
        eta (`float`, 0.0): weight of the fresh noise, eq. 16; 0 is the deterministic DDIM ODE step,
            1 is DDPM's ancestral step. `step(..., eta=...)` overrides it for that step, as diffusers' DDIM
            takes it (stock pipelines pass their `eta` argument, default 0.0, to every step).

    Rule: `solvers.ddim_step` with `solvers.ddim_noise_std`. The previous timestep is the next node of the
    actual grid (never t - T/N), and the last step goes to sigma = 0 (diffusers' `set_alpha_to_one=True`,
    hence `final_alpha_cumprod` = 1).
    """

    @register_to_config
    def __init__(self, eta: float = 0.0, **options):
        _check_eta(eta)
        super().__init__(**options)
        self.final_alpha_cumprod = torch.tensor(1.0)
        self._eta = eta

    def step(self, model_output, timestep, sample, eta: float | None = None, generator=None, return_dict=True):
        """`DiffusionSampler.step`, plus `eta`: this step's noise weight (None: the config's)."""
        self._eta = self.config.eta if eta is None else _check_eta(eta)
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def _update(self, stage, node, x, denoised, eps, generator):
        # | variable | paper (Song et al. 2021, eq. 12) |
        # | alpha_next, sigma_next | sqrt(alpha_{t-1}), sqrt(1 - alpha_{t-1}) |
        # | c_noise | sigma_t(eta), eq. 16 |
        step = self._step(node)
        c_noise = solvers.ddim_noise_std(step, self._eta)
        noise = self._noise_like(x, generator) if c_noise > 0 else None
        return solvers.ddim_step(denoised, eps, step.alpha_next, step.sigma_next, c_noise, noise)


def _check_eta(eta: float) -> float:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM), got {eta}.")
    return eta
