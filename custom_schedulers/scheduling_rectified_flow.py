"""Rectified-flow Euler and Heun (Liu et al. 2022; Esser et al. 2024), and the rectified-flow scheduler."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from .scheduling_ode import ProbabilityFlowODESampler


class RectifiedFlowEulerSampler(ProbabilityFlowODESampler):
    """Euler in the flow time s = sigma/(alpha+sigma) with velocity u = eps - x_0,
    [Liu et al. 2022](https://arxiv.org/abs/2209.03003): diffusers' `FlowMatchEulerDiscreteScheduler`.
    Rule: `solvers.euler_step` in `solvers.to_ode_coordinates(..., "flow")` (`ProbabilityFlowODESampler`).

    Drives any model: an epsilon or v SD model is moved to flow coordinates x/(alpha+sigma) and back.
    Config: the `DiffusionSampler` fields only (`shift` for flow schedules).
    """

    variable = "flow"
    heun = False

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)


class RectifiedFlowHeunSampler(ProbabilityFlowODESampler):
    """Heun in the flow time s (diffusers' `FlowMatchHeunDiscreteScheduler`); two evaluations per step.
    Rules: `solvers.euler_step` then `solvers.heun_step` in "flow" coordinates (`ProbabilityFlowODESampler`).

    Config: the `DiffusionSampler` fields only.
    """

    order = 2
    variable = "flow"
    heun = True
    min_corrected_ratio = 0.0  # s is bounded by 1: the trapezoid in s stays stable for any step

    @register_to_config
    def __init__(self, **options):
        super().__init__(**options)


class RectifiedFlowScheduler(RectifiedFlowEulerSampler):
    """The rectified-flow scheduler: schedule alpha = 1 - s, sigma = s (shifted by `shift`), Euler in s.

    `beta_schedule` is always "flow" (that is what the name means); a config naming betas is overridden.
    Defaults: prediction_type "flow", timestep_spacing "trailing" (s = 1 first), shift 1.0 (SD3 uses 3.0).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]  # a flow schedule only

    @register_to_config
    def __init__(self, prediction_type: str = "flow", **options):
        super().__init__(**{**options, "prediction_type": prediction_type, "beta_schedule": "flow"})
