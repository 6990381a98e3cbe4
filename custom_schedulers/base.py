"""The shared base of every sampler: config, timestep grid, model-output conversion, `step` bookkeeping.

A named sampler (`scheduling_<algo>.py`) only says which update rule runs at each
model evaluation (`_update`) and, for multi-evaluation steps, how evaluations map
to grid nodes (`_plan`). Everything else lives here, once.

The sample stays in the model's own coordinates ``x = alpha x_0 + sigma eps``
(see `schedules`), so ``init_noise_sigma = 1`` and ``scale_model_input`` is the
identity for every sampler, VP or rectified flow.
"""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from . import grids, parameterization, solvers
from .grids import SIGMA_SCHEDULES, TIMESTEP_SPACINGS, SamplingGrid
from .schedules import alphas_cumprod_to_betas, make_schedule

# diffusers' three mutually exclusive booleans -> our one `sigma_schedule` field.
_DIFFUSERS_SIGMA_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential"}


def translate_sigma_flags(options: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' `use_karras_sigmas` / `use_exponential_sigmas` -> our `sigma_schedule`; `use_beta_sigmas`
    has no counterpart and is refused."""
    options = dict(options)
    for flag, name in _DIFFUSERS_SIGMA_FLAGS.items():
        if options.pop(flag, False):
            options["sigma_schedule"] = name
    if options.pop("use_beta_sigmas", False):
        raise ValueError(
            f"use_beta_sigmas is not supported; valid sigma_schedule values: {', '.join(SIGMA_SCHEDULES)}."
        )
    return options


def translate_diffusers_config(config: Mapping[str, Any], flow_grid: str = "flow-match") -> dict[str, Any]:
    """A diffusers scheduler config re-expressed with our keys (the rest passes through unchanged).

    * the sigma flags, see `translate_sigma_flags`;
    * A FlowMatch config (``_class_name`` FlowMatch*, or a ``shift`` and no betas; it names no
      prediction type) -> ``beta_schedule="flow"``, ``prediction_type="flow"`` and, unless it names one,
      ``sigma_schedule=flow_grid`` (the stock flow grid of the sampler's kind: "flow-match" for Euler/Heun,
      "flow-match-multistep" for multistep solvers).
    """
    config = translate_sigma_flags(config)
    no_betas = "beta_schedule" not in config and config.get("trained_betas") is None
    if str(config.get("_class_name", "")).startswith("FlowMatch") or (no_betas and "shift" in config):
        config.setdefault("beta_schedule", "flow")
        config.setdefault("prediction_type", "flow")
        config.setdefault("sigma_schedule", flow_grid)
    return config


class Stage(Enum):
    """What a model evaluation is for: a step's first (or only) evaluation, or a second-order corrector's."""

    PREDICT = "predict"
    CORRECT = "correct"


class Evaluation(NamedTuple):
    """One entry of a sampler's plan: the grid node where the model is evaluated, and what for."""

    node: int
    stage: Stage


# The stock schedulers any of ours can be swapped with (`scheduler.compatibles`), as diffusers' SD family lists them.
SD_FAMILY = [member.name for member in KarrasDiffusionSchedulers]


class DiffusionSampler(SchedulerMixin, ConfigMixin):
    """Base of our samplers: a diffusers scheduler over (noise schedule, prediction type, grid).

    Config fields (the SD ``scheduler_config.json`` keys, plus ours):
        num_train_timesteps (`int`, 1000), beta_start (`float`, 0.00085), beta_end (`float`, 0.012),
        beta_schedule (`"linear" | "scaled_linear" | "squaredcos_cap_v2" | "cosine" | "sigmoid" | "flow"`,
            "scaled_linear"), trained_betas (`list[float] | None`),
        rescale_betas_zero_snr (`bool`, False): zero terminal SNR, [Lin et al. 2023](https://arxiv.org/abs/2305.08891).
        shift (`float`, 1.0): rectified-flow resolution shift, [Esser et al. 2024](https://arxiv.org/abs/2403.03206).
        prediction_type (`"epsilon" | "v_prediction" | "sample" | "flow"`, "epsilon").
        timestep_spacing (`"leading" | "trailing" | "linspace"`, "trailing"): as diffusers' DDIMScheduler.
        steps_offset (`int`, 0): added to "leading" timesteps (SD 1.x uses 1).
        sigma_schedule (`"default" | "karras" | "exponential" | "linear" | "flow-match"`, "default"): "default"
            places nodes by `timestep_spacing`; the next three space noise levels ([Karras et al. 2022](https://arxiv.org/abs/2206.00364)
            eq. 5, uniform log-SNR, uniform level); "flow-match" (flow schedules; the default for a FlowMatch
            config) is `FlowMatchEulerDiscreteScheduler`'s grid, custom sigmas shifted as it shifts them, and
            "flow-match-multistep" (the default of multistep samplers on a FlowMatch config) that of diffusers'
            UniPC / DPM-Solver with `use_flow_sigmas`;
            "kl-optimal" (uniform in arctan sigma), "align-your-steps" / "align-your-steps-sdxl" (Sabour et al. 2024's
            published levels, log-linearly interpolated), and ComfyUI's timestep schedules "beta" (Lee et al.
            2024), "sgm-uniform", "simple", "normal" (see `grids.schedule_timesteps`).
            diffusers' `use_karras_sigmas=True` maps to "karras"; the config mirrors it back (`use_karras_sigmas`,
            `use_exponential_sigmas`) so a stock class built from our config spaces its levels the same way.
        sigma_min (`float | None`, None): the smallest nonzero level of those noise-level schedules (sigma/alpha
            for VP, s for flow); None is the training grid's smallest (diffusers' choice).
        clip_sample (`bool`, False), clip_sample_range (`float`, 1.0): clamp the x_0 estimate.
    """

    config_name = "scheduler_config.json"
    _compatibles: list[str] = SD_FAMILY
    ignore_for_config = ["options"]
    order = 1
    init_noise_sigma = 1.0
    flow_grid = "flow-match"  # the default grid on a FlowMatch config: diffusers' for this kind of sampler

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
        prediction_type: parameterization.PredictionType = "epsilon",
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing",
        steps_offset: int = 0,
        sigma_schedule: grids.SigmaSchedule = "default",
        sigma_min: float | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        parameterization.check_prediction_type(prediction_type)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
        if sigma_min is not None and not sigma_min > 0:
            raise ValueError(f"sigma_min must be a positive noise level or None, got {sigma_min!r}.")
        self.schedule = make_schedule(
            beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas, rescale_betas_zero_snr, shift
        )
        self._set_training_attributes()
        # diffusers' flags for our `sigma_schedule`, for stock classes built from this config (they ignore ours).
        self.register_to_config(use_karras_sigmas=sigma_schedule == "karras",
                                use_exponential_sigmas=sigma_schedule == "exponential")
        self.num_inference_steps: int | None = None
        self.grid: SamplingGrid | None = None
        self._reset_history()
        self._plan: list[Evaluation] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _set_training_attributes(self) -> None:
        """diffusers' attributes with their stock meanings (float32): `betas`, `alphas` = 1 - betas,
        `alphas_cumprod` (read by training scripts for SNR weights), `sigmas` = sqrt((1 - alphas_cumprod) /
        alphas_cumprod) (for flow: s) high to low plus a final 0 and `timesteps` on the training grid, as
        `EulerDiscreteScheduler` before `set_timesteps`."""
        abar = self.schedule.alphas_cumprod
        self.betas = alphas_cumprod_to_betas(abar).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = abar.float()
        levels = grids.native_levels(self.schedule).flip(0)
        self.sigmas = torch.cat([levels, levels.new_zeros(1)]).float()
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)

    # ------------------------------------------------------------ config plumbing

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from any diffusers scheduler config (ours or stock); keyword arguments override it."""
        config, overrides = translate_diffusers_config(config or {}, cls.flow_grid), translate_sigma_flags(kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **overrides)

    @staticmethod
    def _get_init_keys(input_class):
        """Config keys of a class: for ours, the union of the base's and the subclass's `__init__` keywords."""
        keys: set[str] = set()
        for klass in input_class.__mro__:
            if "__init__" in vars(klass) and issubclass(klass, ConfigMixin):
                keys |= set(inspect.signature(klass.__init__).parameters)
        return keys - {"options"}

    # ------------------------------------------------------------ grid

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Build the sampling grid: `num_inference_steps` spaced by the config, or custom `timesteps`
        (training timesteps; s*T for flow) or custom `sigmas` (sigma/alpha for VP, s for flow)."""
        cfg = self.config
        grid = grids.build_grid(
            self.schedule, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, cfg.sigma_schedule,
            timesteps=timesteps, sigmas=sigmas, sigma_min=cfg.sigma_min, shift=cfg.shift,
        )
        parameterization.check_x0_recoverable(cfg.prediction_type, grid.alpha[0])
        self.num_inference_steps = grid.num_steps
        self.grid = grid = self._evaluation_grid(grid)
        self._plan = self._make_plan(grid)
        nodes = [node for node, _ in self._plan]
        self.timesteps = _as_timestep_tensor(grid.timesteps[nodes], device)
        # diffusers' Euler/DPM `sigmas`: the native level at each evaluation, then the final 0.
        self.sigmas = torch.cat([grids.grid_levels(grid, self.schedule.kind)[nodes],
                                 torch.zeros(1, dtype=torch.float64)]).float().to(device)
        self._reset_history()
        self._step_index = None
        self._begin_index = None

    def _reset_history(self) -> None:
        """Forget multistep / second-order state (a new sampling run starts)."""
        self.history = []

    def _evaluation_grid(self, grid: SamplingGrid) -> SamplingGrid:
        """The grid the model is evaluated on: the step grid itself, or with extra nodes (midpoint samplers)."""
        return grid

    def _make_plan(self, grid: SamplingGrid) -> list[Evaluation]:
        """Every model evaluation, in order; one per node by default."""
        return [Evaluation(i, Stage.PREDICT) for i in range(grid.num_steps)]

    # ------------------------------------------------------------ diffusers scheduler contract

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index of `timesteps` (img2img pipelines call this)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """Position of `timestep` in `timesteps`; if it occurs twice (Heun), the second (a step's start)."""
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {timestep} is not on this scheduler's grid {self.timesteps.tolist()}.")
        return int(matches[1 if len(matches) > 1 else 0])

    def noise_level_at(self, index: int) -> tuple[float, float]:
        """(alpha, sigma) at which the model is evaluated for `timesteps[index]`."""
        if self.grid is None:
            raise ValueError("Call `set_timesteps` first.")
        node = self._plan[index][0]
        return float(self.grid.alpha[node]), float(self.grid.sigma[node])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the sample is already in the model's coordinates."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at (fractional) model timesteps (Ho et al. 2020, eq. 4)."""
        alpha, sigma = self._coefficients(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, Sec. 4)."""
        alpha, sigma = self._coefficients(timesteps, sample)
        return alpha * noise - sigma * sample

    def _coefficients(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(timesteps).detach().cpu().reshape(-1)
        alpha, sigma = grids.alpha_sigma_at_timestep(self.schedule, t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alpha.to(like.device, like.dtype).reshape(shape), sigma.to(like.device, like.dtype).reshape(shape))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One model evaluation's update.

        Args:
            model_output: the network output at `timestep` (any `prediction_type`).
            timestep: the current entry of `timesteps` (locates the step on the first call).
            sample: the current sample x, in the model's coordinates.
            generator: random source for stochastic samplers (DDPM, DDIM eta > 0, SDE, LCM).
            return_dict: return a `DDIMSchedulerOutput` (`prev_sample`, `pred_original_sample`) or a tuple.
        """
        if self.grid is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        if self._step_index >= len(self._plan):
            raise ValueError(f"All {len(self._plan)} steps are done; call `set_timesteps` again to restart.")
        node, stage = self._plan[self._step_index]
        compute_dtype = torch.promote_types(sample.dtype, torch.float32)  # fp16/bf16 -> float32; float64 stays
        x = sample.to(compute_dtype)
        denoised, eps = self.denoise(model_output.to(compute_dtype), x, node)
        prev = self._update(stage, node, x, denoised, eps, generator)
        self._step_index += 1
        prev, denoised = prev.to(sample.dtype), denoised.to(sample.dtype)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=denoised) if return_dict else (prev, denoised)

    def denoise(self, model_output: torch.Tensor, x: torch.Tensor, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) at a grid node from the model output, with optional x_0 clipping."""
        alpha, sigma = float(self.grid.alpha[node]), float(self.grid.sigma[node])
        denoised, eps = parameterization.to_x0_eps(model_output, x, alpha, sigma, self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            denoised = denoised.clamp(-r, r)
            eps = (x - alpha * denoised) / sigma  # keep x = alpha x_0 + sigma eps (as diffusers' DDIM does)
        return denoised, eps

    def _update(self, stage: Stage, node: int, x, denoised, eps, generator) -> torch.Tensor:
        raise NotImplementedError

    def _noise_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise drawn as diffusers' schedulers draw it (same generator -> same noise)."""
        return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def _step(self, node: int) -> solvers.Step:
        """The step leaving `node`: its noise levels and its log-SNR size h (from the grid's lambdas)."""
        g = self.grid
        return solvers.Step(float(g.alpha[node]), float(g.sigma[node]), float(g.alpha[node + 1]),
                            float(g.sigma[node + 1]), float(g.lambdas[node + 1] - g.lambdas[node]))


def _check_choice(field: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {field} {value!r}; valid values: {', '.join(valid)}.")


def _as_timestep_tensor(timesteps: torch.Tensor, device) -> torch.Tensor:
    """int64 when every timestep is integral (as diffusers' DDIM), else float32 (as diffusers' Euler)."""
    integral = torch.all(timesteps == timesteps.round())
    return timesteps.to(torch.int64 if integral else torch.float32).to(device)
