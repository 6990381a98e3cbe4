"""Prediction types and the conversions between them.

With ``x_t = alpha * x_0 + sigma * eps`` (see `schedules`), a network predicts one of

* ``epsilon``       eps
* ``sample``        x_0
* ``v_prediction``  v = alpha * eps - sigma * x_0          (Salimans & Ho 2022, Sec. 4)
* ``flow``          u = eps - x_0, the rectified-flow velocity (Liu et al. 2022; Lipman et al. 2023)

and, given (alpha, sigma), any one converts to any other. This module is the only
place where that happens. The conversions are exact for any (alpha, sigma), VP or
not; the only singular cases are recovering x_0 from eps where alpha = 0 (zero
terminal SNR) and eps from x_0 where sigma = 0.
"""

from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; valid values: {', '.join(PREDICTION_TYPES)}."
        )
    return prediction_type


EPSILON_AT_ZERO_SNR = (
    "epsilon prediction at zero terminal SNR is singular: where alpha = 0 the input is pure noise, so an "
    "epsilon model's output carries no information about the image and x_0 = (x_t - sigma*eps)/alpha is 0/0 "
    "(Lin et al. 2023, Sec. 3.2). Zero-terminal-SNR models are trained with v_prediction (recommended with "
    "'trailing' timestep spacing)."
)


def check_zero_terminal_snr(prediction_type: str, zero_terminal_snr: bool) -> None:
    """Refuse epsilon prediction on a zero-terminal-SNR schedule (training, scheduler swaps)."""
    if zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError(EPSILON_AT_ZERO_SNR)


def check_x0_recoverable(prediction_type: str, alpha) -> None:
    """Refuse epsilon prediction where alpha = 0 (sampling from the terminal step of such a schedule)."""
    if prediction_type == "epsilon" and bool(torch.any(torch.as_tensor(alpha) == 0)):
        raise ValueError(
            f"{EPSILON_AT_ZERO_SNR} With this epsilon model, use 'leading' spacing or custom timesteps/sigmas "
            "that start below the terminal timestep."
        )


def _as_coefficient(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample coefficient broadcastable against `like` (batch first)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim else value


def to_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a model output at noise level (alpha, sigma)."""
    check_prediction_type(prediction_type)
    a, s = _as_coefficient(alpha, x_t), _as_coefficient(sigma, x_t)
    if prediction_type == "epsilon":
        check_x0_recoverable(prediction_type, a)
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / s
    elif prediction_type == "v_prediction":
        # [x_t, v] = [[a, s], [-s, a]] [x_0, eps]  =>  invert the rotation-scaling (Salimans & Ho 2022, eq. 9).
        norm = a**2 + s**2
        x0 = (a * x_t - s * model_output) / norm
        eps = (s * x_t + a * model_output) / norm
    else:  # flow: u = eps - x_0 and x_t = a x_0 + s eps  =>  x_0 = (x_t - s u) / (a + s)
        x0 = (x_t - s * model_output) / (a + s)
        eps = model_output + x0
    return x0, eps


def to_x0(model_output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The denoised estimate x_0 from any prediction type."""
    return to_x0_eps(model_output, x_t, alpha, sigma, prediction_type)[0]


def target(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """What a network of this prediction type should output for (x_0, eps) at (alpha, sigma)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    a, s = _as_coefficient(alpha, x0), _as_coefficient(sigma, x0)
    return a * eps - s * x0


def convert(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, source: str, destination: str
) -> torch.Tensor:
    """Re-express a `source`-type prediction as a `destination`-type prediction."""
    x0, eps = to_x0_eps(model_output, x_t, alpha, sigma, source)
    return target(destination, x0, eps, alpha, sigma)
