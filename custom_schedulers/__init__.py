"""Noise schedules and samplers that drop into any diffusers pipeline.

`schedules` (t -> alpha, sigma), `parameterization` (eps / x_0 / v / u), `grids` (which noise
levels a sampler visits), `solvers` (update rules), `base` (the shared SchedulerMixin),
`scheduling_*` (one thin class per algorithm) and `registry` (names -> schedulers).
"""

from diffusers import SchedulerMixin  # lets stock `from_pretrained` resolve ["custom_schedulers", "<Class>"] components

from .base import DiffusionSampler
from .scheduling_ddim import DDIMSampler
from .scheduling_ddpm import DDPMSampler
from .scheduling_dpmpp import DPMSolverPlusPlusSampler, DPMSolverPlusPlusSDESampler
from .scheduling_euler import EulerSampler
from .scheduling_heun import HeunSampler
from .scheduling_lcm import LCMSampler
from .scheduling_named import CosineScheduler, ZeroTerminalSNRScheduler
from .scheduling_rectified_flow import RectifiedFlowEulerSampler, RectifiedFlowHeunSampler, RectifiedFlowScheduler

__all__ = [
    "DiffusionSampler", "DDPMSampler", "DDIMSampler", "DPMSolverPlusPlusSampler", "DPMSolverPlusPlusSDESampler",
    "EulerSampler", "HeunSampler", "RectifiedFlowEulerSampler", "RectifiedFlowHeunSampler", "LCMSampler",
    "CosineScheduler", "ZeroTerminalSNRScheduler", "RectifiedFlowScheduler",
]
