"""Schedulers under the names users look for, composed from a schedule and a solver (no solver code here)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config

from .scheduling_dpmpp import DPMSolverPlusPlusSampler


class CosineScheduler(DPMSolverPlusPlusSampler):
    """DPM-Solver++ 2M on the cosine schedule, [Nichol & Dhariwal 2021](https://arxiv.org/abs/2102.09672) eq. 17.

    `beta_schedule` is always "squaredcos_cap_v2" (that is what the name means); a config naming other
    betas is overridden, so use it for models trained on the cosine schedule.
    """

    @register_to_config
    def __init__(self, **options):
        super().__init__(**{**options, "beta_schedule": "squaredcos_cap_v2"})


class ZeroTerminalSNRScheduler(DPMSolverPlusPlusSampler):
    """DPM-Solver++ 2M on the zero-terminal-SNR rescale of the config's schedule,
    [Lin et al. 2023](https://arxiv.org/abs/2305.08891): alpha_T = 0 exactly, trailing spacing so sampling
    starts there, v_prediction by default. `rescale_betas_zero_snr` is always True.

    An epsilon model is refused at `set_timesteps` (x_0 is not recoverable at alpha = 0).
    """

    @register_to_config
    def __init__(self, prediction_type: str = "v_prediction", timestep_spacing: str = "trailing", **options):
        super().__init__(
            **{**options, "prediction_type": prediction_type, "timestep_spacing": timestep_spacing,
               "rescale_betas_zero_snr": True}
        )
