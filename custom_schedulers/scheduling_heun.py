"""Heun's second-order method on the probability-flow ODE in sigma/alpha (Karras et al. 2022, Algorithm 1)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from .scheduling_ode import ProbabilityFlowODESampler


class HeunSampler(ProbabilityFlowODESampler):
    """Heun in (x/alpha, sigma/alpha), [Karras et al. 2022](https://arxiv.org/abs/2206.00364) Alg. 1 without churn:
    k-diffusion's `sample_heun`. Two model evaluations per step (one for the final step into sigma = 0).
    Rules: `solvers.euler_step` then `solvers.heun_step` in "ve" coordinates (`ProbabilityFlowODESampler`).

    Config: the `DiffusionSampler` fields only.
    """

    order = 2
    variable = "ve"
    heun = True

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)
