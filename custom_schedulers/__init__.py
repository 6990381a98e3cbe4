"""Noise schedules and samplers that drop into any diffusers pipeline.

`schedules` (t -> alpha, sigma), `parameterization` (eps / x_0 / v / u), `grids` (which noise
levels a sampler visits), `solvers` (update rules), `base` (the shared SchedulerMixin),
`scheduling_*` (one thin class per algorithm) and `registry` (names -> schedulers).
"""

from diffusers import SchedulerMixin  # noqa: F401 (stock `from_pretrained` checks components against <library>.SchedulerMixin)

from .base import DiffusionSampler
from .scheduling_adams import DEISSampler, IPNDMSampler
from .scheduling_ancestral import EulerAncestralSampler
from .scheduling_ddim import DDIMSampler
from .scheduling_ddpm import DDPMSampler
from .scheduling_dpmpp import DPMSolverPlusPlus3MSDESampler, DPMSolverPlusPlusSampler, DPMSolverPlusPlusSDESampler
from .scheduling_dpmpp_2s import DPMSolverPlusPlus2SAncestralSampler, DPMSolverPlusPlusSinglestepSDESampler
from .scheduling_er_sde import ERSDESampler
from .scheduling_euler import EulerSampler
from .scheduling_exponential import ExponentialHeunSampler, ResMultistepSampler
from .scheduling_heun import HeunSampler
from .scheduling_lcm import LCMSampler
from .scheduling_named import CosineScheduler, ZeroTerminalSNRScheduler
from .scheduling_rectified_flow import RectifiedFlowEulerSampler, RectifiedFlowHeunSampler, RectifiedFlowScheduler
from .scheduling_unipc import UniPCSampler

__all__ = [
    "DiffusionSampler", "DDPMSampler", "DDIMSampler", "DPMSolverPlusPlusSampler", "DPMSolverPlusPlusSDESampler",
    "EulerSampler", "HeunSampler", "RectifiedFlowEulerSampler", "RectifiedFlowHeunSampler", "LCMSampler",
    "CosineScheduler", "ZeroTerminalSNRScheduler", "RectifiedFlowScheduler", "UniPCSampler",
    "EulerAncestralSampler", "DPMSolverPlusPlus2SAncestralSampler", "DPMSolverPlusPlusSinglestepSDESampler",
    "DPMSolverPlusPlus3MSDESampler", "IPNDMSampler", "DEISSampler", "ResMultistepSampler", "ExponentialHeunSampler",
    "ERSDESampler",
]

# A stock pipeline's `save_pretrained` records a component as [its class's module, class name] in model_index.json,
# and `from_pretrained` resolves that module from sys.modules and looks up `SchedulerMixin` in it. Our classes
# report this package as their module (as NumPy's public classes report `numpy`), so a saved pipeline names
# ["custom_schedulers", "<Class>"]: it loads after `import custom_schedulers`, whichever file defines the class.
for _cls in (
    DiffusionSampler, DDPMSampler, DDIMSampler, DPMSolverPlusPlusSampler, DPMSolverPlusPlusSDESampler, EulerSampler,
    HeunSampler, RectifiedFlowEulerSampler, RectifiedFlowHeunSampler, LCMSampler, CosineScheduler,
    ZeroTerminalSNRScheduler, RectifiedFlowScheduler, UniPCSampler, EulerAncestralSampler,
    DPMSolverPlusPlus2SAncestralSampler, DPMSolverPlusPlusSinglestepSDESampler, DPMSolverPlusPlus3MSDESampler,
    IPNDMSampler, DEISSampler, ResMultistepSampler, ExponentialHeunSampler, ERSDESampler,
):
    _cls.__module__ = __name__
del _cls
