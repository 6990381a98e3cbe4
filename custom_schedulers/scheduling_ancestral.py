"""Ancestral samplers: a deterministic step to a lower level, then fresh noise up to the next one ("Euler a")."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from . import solvers
from .base import DiffusionSampler


class EulerAncestralSampler(DiffusionSampler):
    """Euler ancestral ("Euler a"): Euler in (x/alpha, sigma/alpha) down to tau_down, then fresh noise of std
    tau_up (tau_down^2 + tau_up^2 = tau_next^2): diffusers' `EulerAncestralDiscreteScheduler`, k-diffusion's
    `sample_euler_ancestral` ([Karras et al. 2022](https://arxiv.org/abs/2206.00364); eta as in DDIM eq. 16).

    Rules: `solvers.ancestral_levels`, `solvers.ancestral_euler_step`. The noise comes from the `generator`
    passed to `step` (a list of per-image generators keeps every image's noise a function of its own seed).
    Config (besides the `DiffusionSampler` fields):
        eta (`float`, 1.0): the share of the posterior's noise; 0 is plain Euler.
    """

    @register_to_config
    def __init__(self, eta: float = 1.0, **options):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = Euler, 1 = ancestral), got {eta}.")
        super().__init__(**options)

    def _update(self, stage, node, x, denoised, eps, generator):
        step = self._step(node)
        tau, tau_next = solvers.ve_level(step.alpha, step.sigma), solvers.ve_level(step.alpha_next, step.sigma_next)
        tau_down, tau_up = solvers.ancestral_levels(tau, tau_next, self.config.eta)
        noise = self._noise_like(x, generator) if tau_up > 0 else None
        return solvers.ancestral_euler_step(denoised, eps, step.alpha_next, tau_down, tau_up, noise)
