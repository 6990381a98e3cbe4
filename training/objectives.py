"""The diffusion training objective: noise levels, noisy inputs, targets and Min-SNR weights.

Conventions are those of `custom_schedulers.schedules` (x_t = alpha*x_0 + sigma*eps,
t = 0 cleanest) and `custom_schedulers.parameterization` (targets for epsilon,
v_prediction, sample and flow); nothing is re-derived here.

Min-SNR-gamma (Hang et al. 2023) caps the per-timestep weight of the *x_0 error*
at gamma: w_x0 = min(SNR, gamma). A network predicting y has
|x_0 error|^2 = c_y * |y error|^2 with c_y = (d x_0 / d y)^2, so the loss on y is
weighted by min(SNR, gamma) * c_y:

    epsilon       c = 1/SNR           w = min(SNR, g) / SNR      (1 for SNR <= g, g/SNR above)
    v_prediction  c = 1/(SNR+1) (VP)  w = min(SNR, g) / (SNR+1)
    sample        c = 1               w = min(SNR, g)
    flow          c = sigma^2         w = min(SNR, g) * sigma^2  =  min(SNR, g) / (1 + sqrt(SNR))^2
                  (x_0 = x_t - sigma*u for alpha + sigma = 1, so d x_0 / d u = -sigma)

All four are written so that SNR = 0 and SNR = inf give finite limits (epsilon: 1
and 0; v: 0 and 0; sample: 0 and g; flow: 0 and 0). The SNR is the one of the
schedule actually trained, i.e. after any zero-terminal-SNR rescale (kohya's
sd-scripts uses the SNR before it, issue #1263).

Zero terminal SNR, our choices (diffusers #9451):
* epsilon: min(SNR, g)/SNR is 0/0 at SNR = 0; we use its limit, 1 (no division).
  Epsilon with zero terminal SNR is refused anyway (`check_objective`): x_0 is not
  recoverable there.
* v / sample / flow: the paper's weights are exactly 0 at SNR = 0 (the x_0-space
  weight min(SNR, g) vanishes), so the pure-noise step, the first step of every
  trailing-spacing sampler, would never be trained. `snr_floor` bounds the x_0-space
  weight from below: w_x0 = max(min(SNR, g), floor). floor = 1 is Salimans & Ho's
  "truncated SNR" weight max(SNR, 1) (2022, Sec. 4) capped at g; it gives the
  terminal step weight 1 (v, sample) and leaves every step with SNR >= 1 as in the
  paper. It is off unless asked for (`--snr_floor 1`), and the training script warns
  when zero terminal SNR is combined with Min-SNR without it. It does not apply to
  epsilon, whose weight at low SNR is already 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from custom_schedulers import parameterization
from custom_schedulers.schedules import NoiseSchedule, flow_schedule, make_schedule, shift_sigmas
from training.loss_options import debiased_weights, pyramid_noise

BETA_SCHEDULE_NAMES = {"cosine": "squaredcos_cap_v2"}  # our name -> diffusers' config name


def check_objective(prediction_type: str, zero_terminal_snr: bool) -> None:
    """Refuse mathematically singular combinations before any work is done."""
    parameterization.check_prediction_type(prediction_type)
    try:
        parameterization.check_zero_terminal_snr(prediction_type, zero_terminal_snr)
    except ValueError as error:
        raise ValueError(f"--zero_terminal_snr with --prediction_type epsilon: {error}") from None
    if zero_terminal_snr and prediction_type == "flow":
        raise ValueError(
            "--zero_terminal_snr applies to VP schedules; rectified flow already reaches pure noise "
            "at sigma = 1. Drop --zero_terminal_snr for --prediction_type flow."
        )


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str, snr_floor: float | None = None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 8 and App. A) for a prediction type.

    Finite for SNR in [0, inf]; `snr_floor` bounds the x_0-space weight from below (v/sample/flow),
    see the module docstring.
    """
    parameterization.check_prediction_type(prediction_type)
    snr = snr.to(torch.float64)
    if prediction_type == "epsilon":
        return torch.where(snr <= gamma, torch.ones_like(snr), gamma / snr)
    x0_weight = snr.clamp(max=gamma)
    if snr_floor is not None:
        x0_weight = x0_weight.clamp(min=min(snr_floor, gamma))
    if prediction_type == "v_prediction":
        return x0_weight / (snr + 1)
    if prediction_type == "sample":
        return x0_weight
    # flow: sigma^2 = 1 / (1 + sqrt(SNR))^2 since sqrt(SNR) = (1 - sigma) / sigma.
    return torch.where(torch.isinf(snr), torch.zeros_like(snr), x0_weight / (1 + snr.sqrt()) ** 2)


@dataclass(frozen=True)
class Objective:
    """What is trained: a noise schedule, a prediction type and how noise levels are drawn."""

    schedule: NoiseSchedule
    prediction_type: str
    snr_gamma: float | None = None
    snr_floor: float | None = None
    timestep_sampling: str = "uniform"  # "uniform" | "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    debiased_estimation: bool = False  # training.loss_options (Yu et al. 2024)
    multires_noise_iterations: int = 0  # training.loss_options (Whitaker 2023); 0 = white noise
    multires_noise_discount: float = 0.3

    @property
    def is_flow(self) -> bool:
        return self.schedule.kind == "flow"

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    # -------------------------------------------------------- noise levels

    def sample_levels(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timestep for the UNet, alpha, sigma) for a batch: integer t for VP, s*T for flow."""
        if self.timestep_sampling == "uniform" and not self.is_flow:
            return self.vp_levels(torch.randint(0, self.num_train_timesteps, (batch,), generator=generator))
        if self.timestep_sampling == "logit_normal":
            # Logit-normal noise levels (Esser et al. 2024, SD3, eq. 19); s near 1 is the noisiest.
            u = torch.randn(batch, generator=generator, dtype=torch.float64)
            s = torch.sigmoid(self.logit_mean + self.logit_std * u)
        else:
            s = torch.rand(batch, generator=generator, dtype=torch.float64)
        if self.is_flow:
            return self.flow_levels(s)
        # VP with logit-normal levels: s picks the integer timestep floor(s*T).
        return self.vp_levels((s * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1))

    def flow_levels(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow noise levels s in [0, 1] -> shifted sigma, fed to the UNet as sigma*T (diffusers' FlowMatch)."""
        sigma = shift_sigmas(s.to(torch.float64), self.flow_shift)
        return sigma * self.num_train_timesteps, 1.0 - sigma, sigma

    def vp_levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return t, self.schedule.alpha[t], self.schedule.sigma[t]

    def fixed_levels(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evenly spread noise levels, the same every call (for the validation loss)."""
        if self.is_flow:
            return self.flow_levels((torch.arange(batch, dtype=torch.float64) + 0.5) / batch)
        t = torch.linspace(0, self.num_train_timesteps - 1, batch).round().long()
        return self.vp_levels(t)

    # -------------------------------------------------------- noisy input, target, weights

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        if self.multires_noise_iterations:
            noise = pyramid_noise(noise, generator, self.multires_noise_iterations, self.multires_noise_discount)
        if self.noise_offset:
            # Offset noise (Guttenberg 2023, "Diffusion with offset noise"): a per-channel constant shift.
            noise = noise + self.noise_offset * torch.randn(x0.shape[:2] + (1, 1), generator=generator, dtype=x0.dtype)
        return noise.to(x0.device)

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma, generator: torch.Generator):
        """x_t = alpha*x0 + sigma*(noise + g*xi); the target keeps `noise` (Ning et al. 2023, eq. 4)."""
        model_noise = noise
        if self.input_perturbation:
            xi = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
            model_noise = noise + self.input_perturbation * xi
        return self.diffuse(x0, model_noise, alpha, sigma)

    @staticmethod
    def diffuse(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The forward process x_t = alpha*x0 + sigma*noise, per-sample alpha and sigma (DESIGN.md)."""
        return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
        return parameterization.target(self.prediction_type, x0, noise, alpha.to(x0), sigma.to(x0))

    def loss_weights(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR and/or debiased-estimation weights per sample (their product), or None for the plain MSE."""
        snr = (alpha.to(torch.float64) / sigma.to(torch.float64)) ** 2
        weights = None
        if self.snr_gamma is not None:
            weights = min_snr_weights(snr, self.snr_gamma, self.prediction_type, self.snr_floor)
        if self.debiased_estimation:
            debiased = debiased_weights(snr, self.prediction_type)
            weights = debiased if weights is None else weights * debiased
        return weights

    def loss(self, model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error, per-sample weighted (diffusers' train_text_to_image loss); `mask` (B, 1, H, W) at the
        latent size weights each latent pixel (masked loss)."""
        squared = F.mse_loss(model_output.float(), target.float(), reduction="none")
        if mask is not None:
            squared = squared * mask.to(squared)
        per_sample = squared.mean(dim=(1, 2, 3))
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample)
        return per_sample.mean()


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value).to(device=like.device, dtype=like.dtype)
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def build_schedule(
    prediction_type: str,
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
    flow_shift: float = 1.0,
) -> NoiseSchedule:
    """The training schedule: rectified flow for `flow`, otherwise the (rescaled) VP schedule."""
    if prediction_type == "flow":
        return flow_schedule(num_train_timesteps, flow_shift)
    return make_schedule(
        BETA_SCHEDULE_NAMES.get(beta_schedule, beta_schedule), num_train_timesteps, beta_start, beta_end,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def logit_normal_density(s: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Density of sigmoid(N(mean, std^2)) at s (SD3 eq. 19), for tests and plots."""
    logit = torch.log(s / (1 - s))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * s * (1 - s))
