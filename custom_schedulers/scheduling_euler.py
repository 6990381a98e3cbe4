"""Euler on the probability-flow ODE in the VE noise level sigma/alpha (Karras et al. 2022)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from .scheduling_ode import ProbabilityFlowODESampler


class EulerSampler(ProbabilityFlowODESampler):
    """Euler in (x/alpha, sigma/alpha), [Karras et al. 2022](https://arxiv.org/abs/2206.00364) Alg. 1 without churn:
    diffusers' `EulerDiscreteScheduler` and k-diffusion's `sample_euler` (their sample is our x / alpha).
    Rule: `solvers.euler_step` in `solvers.to_ode_coordinates(..., "ve")`, driven by `ProbabilityFlowODESampler`.

    Config: the `DiffusionSampler` fields only.
    """

    variable = "ve"
    heun = False

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)
