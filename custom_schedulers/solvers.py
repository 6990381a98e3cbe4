"""Update rules of the samplers, as pure functions (no ``self``, no config).

Notation (see `schedules`): the sample is kept in the model's own coordinates,
``x = alpha * x_0 + sigma * eps``. A step goes from the grid node ``(alpha, sigma)``
to the next, less noisy node ``(alpha_next, sigma_next)``; ``denoised`` is the
model's x_0 estimate at the current node and ``eps`` its noise estimate
(both from `parameterization.to_x0_eps`). Multistep rules also take the older
x_0 estimates in ``history`` (newest first) and the log-SNR steps ``h``.

The first-order rules coincide: DDIM with eta = 0 (Song et al. 2021), Euler on
the probability-flow ODE in (x/alpha, sigma/alpha) (Karras et al. 2022),
rectified-flow Euler in (x/(alpha+sigma), sigma/(alpha+sigma)) (Liu et al. 2022)
and first-order DPM-Solver++ all give ``alpha_next * x_0 + sigma_next * eps``
when x_0 and eps are held fixed over the step. The higher-order rules differ
in the variable they integrate in: ``lambda = log(alpha/sigma)`` for
DPM-Solver++, the VE noise level ``sigma/alpha`` for Heun, the flow time
``sigma/(alpha+sigma)`` for rectified-flow Heun.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Step:
    """One step from the grid node (alpha, sigma) to the next, less noisy node (alpha_next, sigma_next), and its
    log-SNR size h = lambda_next - lambda with lambda = log(alpha/sigma) (Lu et al. 2022b, h_i). Named fields, so
    that no two of them can be swapped silently at a call site."""

    alpha: float
    sigma: float
    alpha_next: float
    sigma_next: float
    h: float

    @classmethod
    def between(cls, alpha: float, sigma: float, alpha_next: float, sigma_next: float) -> Step:
        """The step between two noise levels, h computed here (samplers take h from their grid's lambdas)."""
        return cls(alpha, sigma, alpha_next, sigma_next, _lambda(alpha_next, sigma_next) - _lambda(alpha, sigma))


def _lambda(alpha: float, sigma: float) -> float:
    """log(alpha/sigma): -inf at alpha = 0, +inf at sigma = 0."""
    if alpha == 0.0 or sigma == 0.0:
        return math.inf if alpha else -math.inf
    return math.log(alpha) - math.log(sigma)

# ---------------------------------------------------------------- DDPM / DDIM


def ddim_noise_std(step: Step, eta: float) -> float:
    """eta * std of q(x_next | x, x_0) (Song et al. 2021, DDIM, eq. 16, written for any (alpha, sigma)).

    With alpha_{t|s} = alpha/alpha_next the DDPM posterior variance is
    sigma_next^2 * (1 - (alpha * sigma_next)^2 / (alpha_next * sigma)^2); eta = 1 is DDPM, eta = 0 is DDIM.
    """
    if step.sigma_next == 0.0:
        return 0.0
    ratio = (step.alpha * step.sigma_next) ** 2 / (step.alpha_next * step.sigma) ** 2
    return eta * step.sigma_next * math.sqrt(max(1.0 - ratio, 0.0))


def ddim_step(
    denoised: torch.Tensor, eps: torch.Tensor, alpha_next: float, sigma_next: float,
    c_noise: float = 0.0, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_next = alpha_next x_0 + sqrt(sigma_next^2 - c^2) eps + c z (Song et al. 2021, eq. 12)."""
    x_next = alpha_next * denoised + math.sqrt(max(sigma_next**2 - c_noise**2, 0.0)) * eps
    if c_noise > 0.0:
        x_next = x_next + c_noise * noise
    return x_next


def ddpm_step(x: torch.Tensor, denoised: torch.Tensor, step: Step, noise: torch.Tensor | None) -> torch.Tensor:
    """Ancestral step: sample q(x_next | x, x_0), the posterior of the forward process (Ho et al. 2020, eqs. 6-7).

    alpha_ts = alpha/alpha_next and sigma_ts^2 = sigma^2 - alpha_ts^2 sigma_next^2 describe x given x_next;
    the posterior mean is (alpha_ts sigma_next^2 x + alpha_next sigma_ts^2 x_0) / sigma^2.
    """
    alpha, sigma, alpha_next, sigma_next = step.alpha, step.sigma, step.alpha_next, step.sigma_next
    alpha_ts = alpha / alpha_next
    sigma_ts2 = max(sigma**2 - alpha_ts**2 * sigma_next**2, 0.0)
    mean = (alpha_ts * sigma_next**2 / sigma**2) * x + (alpha_next * sigma_ts2 / sigma**2) * denoised
    std = math.sqrt(sigma_ts2) * sigma_next / sigma
    return mean + std * noise if std > 0.0 else mean


# ---------------------------------------------------------------- ODE steps in a chosen time variable


def euler_step(x: torch.Tensor, d: torch.Tensor, dt: float) -> torch.Tensor:
    """x + d dt: one Euler step of dx/dt = d (k-diffusion `sample_euler`; Karras et al. 2022, Alg. 1 with no churn)."""
    return x + d * dt


def heun_step(x: torch.Tensor, d: torch.Tensor, d_2: torch.Tensor, dt: float) -> torch.Tensor:
    """x + (d + d_2)/2 dt: the trapezoidal corrector (Karras et al. 2022, Algorithm 1, lines 7-8)."""
    d_prime = (d + d_2) / 2
    return x + d_prime * dt


# ---------------------------------------------------------------- DPM-Solver++ (Lu et al. 2022b)


def dpmpp_1_step(x: torch.Tensor, denoised: torch.Tensor, step: Step) -> torch.Tensor:
    """First-order DPM-Solver++ = DDIM (Lu et al. 2022b, eq. 9 with k = 1)."""
    return (step.sigma_next / step.sigma) * x - step.alpha_next * math.expm1(-step.h) * denoised


def dpmpp_2m_step(
    x: torch.Tensor, denoised: torch.Tensor, old_denoised: torch.Tensor, step: Step, *, h_last: float
) -> torch.Tensor:
    """Multistep second-order DPM-Solver++ (Lu et al. 2022b, Algorithm 2), r = h_last / h."""
    r = h_last / step.h
    D = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (step.sigma_next / step.sigma) * x - step.alpha_next * math.expm1(-step.h) * D


def dpmpp_3m_step(
    x: torch.Tensor, history: list[torch.Tensor], step: Step, *, h_last: float, h_last2: float
) -> torch.Tensor:
    """Multistep third-order DPM-Solver++ (Lu et al. 2022b, Sec. 3.2 with a quadratic Taylor model of x_0 in lambda).

    history = [x_0 now, x_0 one node back, x_0 two nodes back]; r0 = h_last/h, r1 = h_last2/h.
    D1 ~ h x_0' and D2 ~ h^2 x_0'' (backward divided differences), and the exact integral of the
    quadratic is x' = (sigma'/sigma) x - alpha' phi_1 x_0 + alpha' phi_2 D1 - alpha' phi_3 D2.
    Note: diffusers' and the reference implementation's multistep third-order update use
    D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 x_0''/2, half the x_0'' term, which leaves an O(h^3) local
    error (second order overall); `tests/test_solvers.py` measures local order 4 for this one.
    """
    m0, m1, m2 = history
    h, sigma, alpha_next, sigma_next = step.h, step.sigma, step.alpha_next, step.sigma_next
    r0, r1 = h_last / h, h_last2 / h
    D1_0, D1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = 2.0 * (D1_0 - D1_1) / (r0 + r1)
    phi_1 = math.expm1(-h)  # e^{-h} - 1
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return (sigma_next / sigma) * x - alpha_next * phi_1 * m0 + alpha_next * phi_2 * D1 - alpha_next * phi_3 * D2


def taylor_derivatives(offsets: list[float], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Derivatives p^(k)(0), k = 0..n-1, of the polynomial through (offsets[j], values[j]) (n points)."""
    n = len(offsets)
    vandermonde = np.array([[u**k / math.factorial(k) for k in range(n)] for u in offsets], dtype=np.float64)
    weights = np.linalg.inv(vandermonde)  # p^(k)(0) = sum_j weights[k, j] * values[j]
    return [sum(float(weights[k, j]) * values[j] for j in range(n)) for k in range(n)]


def exponential_taylor_step(x: torch.Tensor, derivatives: list[torch.Tensor], step: Step) -> torch.Tensor:
    """The data-prediction exponential integrator with x_0(lambda) replaced by its Taylor polynomial at the step's
    start: x' = (sigma'/sigma) x + alpha' sum_k x_0^(k) psi_k(h) (Lu et al. 2022b, eq. 8-9), where
    psi_k(h) = int_0^h e^{-v} (h - v)^k / k! dv, i.e. psi_0 = 1 - e^{-h} and psi_k = h^k/k! - psi_{k-1}."""
    h, alpha_next = step.h, step.alpha_next
    psi = -math.expm1(-h)
    x_next = (step.sigma_next / step.sigma) * x + alpha_next * psi * derivatives[0]
    for k in range(1, len(derivatives)):
        psi = h**k / math.factorial(k) - psi
        x_next = x_next + alpha_next * psi * derivatives[k]
    return x_next


def dpmpp_sde_step(
    x: torch.Tensor, history: list[torch.Tensor], step: Step, noise: torch.Tensor, *, h_last: float | None
) -> torch.Tensor:
    """SDE-DPM-Solver++ 1 or 2M, midpoint form (Lu et al. 2022b, App. D; diffusers' 'sde-dpmsolver++').

    Uses the second-order correction when an older x_0 (history[1]) and h_last are given.
    """
    h, sigma, alpha_next, sigma_next = step.h, step.sigma, step.alpha_next, step.sigma_next
    D = history[0]
    if h_last is not None and len(history) > 1:
        D = D + 0.5 * (history[0] - history[1]) * (h / h_last)
    decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    return (sigma_next / sigma) * math.exp(-h) * x + alpha_next * decay * D + sigma_next * math.sqrt(decay) * noise


# ---------------------------------------------------------------- consistency models


def consistency_boundary(timestep: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency parameterisation (Song et al. 2023, eq. 7; LCM, Luo et al. 2023, eq. 9)."""
    t = timestep * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / math.sqrt(t**2 + sigma_data**2)
    return c_skip, c_out


def consistency_step(denoised: torch.Tensor, step: Step, noise: torch.Tensor | None) -> torch.Tensor:
    """Multistep consistency sampling: re-noise the x_0 estimate to the next level (Song et al. 2023, Alg. 1)."""
    if step.sigma_next == 0.0:
        return step.alpha_next * denoised
    return step.alpha_next * denoised + step.sigma_next * noise


# ---------------------------------------------------------------- ODE coordinates


def to_ode_coordinates(x: torch.Tensor, alpha: float, sigma: float, variable: str) -> tuple[torch.Tensor, float]:
    """(y, tau) in which the probability-flow ODE is dy/dtau = d:
    "ve": y = x/alpha, tau = sigma/alpha, d = eps (Karras et al. 2022, eq. 4 with s = 1; Song et al. 2021, DDIM eq. 14);
    "flow": y = x/(alpha+sigma), tau = sigma/(alpha+sigma), d = eps - x_0 (Liu et al. 2022, rectified flow)."""
    scale = alpha if variable == "ve" else alpha + sigma
    return x / scale, sigma / scale


def from_ode_coordinates(y: torch.Tensor, alpha: float, sigma: float, variable: str) -> torch.Tensor:
    """Inverse of `to_ode_coordinates` at (alpha, sigma)."""
    return y * (alpha if variable == "ve" else alpha + sigma)


def ode_derivative(denoised: torch.Tensor, eps: torch.Tensor, variable: str) -> torch.Tensor:
    """dy/dtau in the chosen coordinates: eps ("ve", k-diffusion's `to_d`) or u = eps - x_0 ("flow")."""
    return eps if variable == "ve" else eps - denoised


# ---------------------------------------------------------------- UniPC (Zhao et al. 2023)


def unipc_step(
    x: torch.Tensor, history: list[torch.Tensor], rks: list[float], step: Step, variant: str,
    denoised_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP (predictor; `denoised_next` None) or UniC (corrector) with the B(h) variant "bh1" (B(h) = h) or "bh2"
    (B(h) = e^h - 1), data prediction (Zhao et al. 2023, Algorithms 2-3, eq. 8; diffusers' UniPC `predict_x0`).

    history = x_0 estimates newest first (m_0 at the step's start, then older ones), rks[i] = (lambda of
    history[i + 1]'s node - lambda_0) / h. The order p is len(history); the corrector's is p + 1: it also fits
    `denoised_next`, the estimate at the predicted sample, reused without a new model evaluation.
    """
    order = len(history)
    m0, hh = history[0], -step.h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    B_h = hh if variant == "bh1" else h_phi_1
    x_next = (step.sigma_next / step.sigma) * x - step.alpha_next * h_phi_1 * m0
    D1s = [(m - m0) / rk for m, rk in zip(history[1:], rks)]
    if denoised_next is not None:
        D1s.append(denoised_next - m0)
    if not D1s:
        return x_next
    rhos = _unipc_rhos(rks, hh, B_h, order, corrector=denoised_next is not None)
    return x_next - step.alpha_next * B_h * sum(rho * D1 for rho, D1 in zip(rhos, D1s))


def _unipc_rhos(rks: list[float], hh: float, B_h: float, order: int, corrector: bool) -> list[float]:
    """The weights of the divided differences: R rho = b with R[i][k] = r_k^i and b_i = i! h phi_{i+1}(h) / B(h)
    (Zhao et al. 2023, eq. 8), p x p for the corrector and its leading (p-1) x (p-1) block for the predictor;
    the order-2 predictor and order-1 corrector use rho = 1/2 (their Sec. 3.2 note)."""
    if order == (1 if corrector else 2):
        return [0.5]
    r = np.array([*rks, 1.0], dtype=np.float64)
    R = np.stack([r**i for i in range(order)])
    b, h_phi_k, factorial = [], math.expm1(hh) / hh - 1, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    size = order if corrector else order - 1
    return np.linalg.solve(R[:size, :size], np.array(b[:size])).tolist()


# ---------------------------------------------------------------- ancestral sampling


def ve_level(alpha: float, sigma: float) -> float:
    """The VE noise level tau = sigma/alpha (inf where alpha = 0)."""
    return sigma / alpha if alpha > 0 else math.inf


def ancestral_levels(tau: float, tau_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(tau_down, tau_up): the step from VE level tau to tau_next split into a deterministic step to tau_down and
    fresh noise of std tau_up, tau_down^2 + tau_up^2 = tau_next^2; eta = 1 is the DDPM posterior's noise (Song
    et al. 2021, eq. 16 in VE levels; k-diffusion's `get_ancestral_step`). tau = inf (alpha = 0) is its limit."""
    if tau_next == 0.0:
        return 0.0, 0.0
    ratio = 1.0 if math.isinf(tau) else (tau**2 - tau_next**2) / tau**2
    tau_up = min(tau_next, eta * tau_next * math.sqrt(max(ratio, 0.0)))
    return math.sqrt(tau_next**2 - tau_up**2), tau_up


def ancestral_euler_step(
    denoised: torch.Tensor, eps: torch.Tensor, alpha_next: float, tau_down: float, tau_up: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Euler to tau_down, then fresh noise of std tau_up, in VE coordinates y = x/alpha: y' = x_0 + tau_down eps
    + tau_up z (k-diffusion `sample_euler_ancestral`), returned as x' = alpha_next y'."""
    y_next = denoised + tau_down * eps
    if tau_up > 0.0:
        y_next = y_next + tau_up * noise
    return alpha_next * y_next


def ve_to_alpha_sigma(tau: float, kind: str) -> tuple[float, float]:
    """(alpha, sigma) of VE level tau = sigma/alpha on a schedule of `kind`: VP alpha^2 + sigma^2 = 1, or flow
    alpha + sigma = 1; tau = inf is (0, 1)."""
    if math.isinf(tau):
        return 0.0, 1.0
    if kind == "flow":
        return 1.0 / (1.0 + tau), tau / (1.0 + tau)
    alpha = 1.0 / math.sqrt(1.0 + tau * tau)
    return alpha, tau * alpha


def renoise(x: torch.Tensor, alpha: float, alpha_next: float, tau_up: float, noise: torch.Tensor | None) -> torch.Tensor:
    """Fresh noise of std tau_up in VE coordinates, y' = x/alpha + tau_up z, returned as alpha_next y' (the level
    (alpha_next, sigma_next) has tau_next^2 = tau^2 + tau_up^2): the ancestral samplers' noise step."""
    y = x / alpha
    return alpha_next * (y + tau_up * noise if tau_up > 0.0 else y)


def dpmpp_3m_sde_step(
    x: torch.Tensor, history: list[torch.Tensor], step: Step, eta: float, noise: torch.Tensor | None, *,
    h_last: float | None = None, h_last2: float | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022b, App. D, with k-diffusion's `sample_dpmpp_3m_sde` multistep
    corrections): the exponential integrator over h_eta = (1 + eta) h with x_0 extrapolated from up to three
    estimates (history, newest first), plus noise of std sigma_next sqrt(1 - e^{-2 eta h}).
    In VE coordinates k-diffusion's x' = e^{-h_eta} x + (1 - e^{-h_eta}) x_0 + phi_2 D1 - phi_3 D2 + noise;
    here x' = (sigma'/sigma) e^{-eta h} x + alpha' (...), finite also from alpha = 0."""
    h_eta = step.h * (eta + 1)
    m0 = history[0]
    x_next = (step.sigma_next / step.sigma) * math.exp(-eta * step.h) * x - step.alpha_next * math.expm1(-h_eta) * m0
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if len(history) >= 3:
        r0, r1 = h_last / step.h, h_last2 / step.h
        d1_0, d1_1 = (m0 - history[1]) / r0, (history[1] - history[2]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_next = x_next + step.alpha_next * (phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2)
    elif len(history) == 2:
        x_next = x_next + step.alpha_next * phi_2 * (m0 - history[1]) / (h_last / step.h)
    if noise is not None:
        x_next = x_next + step.sigma_next * math.sqrt(-math.expm1(-2 * step.h * eta)) * noise
    return x_next


# ---------------------------------------------------------------- Adams-Bashforth on the ODE (iPNDM, DEIS)

# Constant-step Adams-Bashforth weights of d_i, d_{i-1}, ... (newest first): iPNDM's pseudo linear multistep
# warm-started from lower orders (Zhang & Chen 2023, DEIS, Sec. 5 "iPNDM"; Liu et al. 2022, PNDM, eq. 12).
IPNDM_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(24)


def adams_bashforth_weights(taus: list[float], tau_next: float, time=None) -> list[float]:
    """w_j = int_{tau_0}^{tau_next} l_j(s(tau)) dtau: the step y' = y + sum_j w_j d_j integrates the Lagrange
    polynomial through (s(taus[j]), d_j) in the time variable s = `time`(tau) (identity: the variable-step
    Adams-Bashforth of k-diffusion's `sample_ipndm_v`; `deis_time`: DEIS's tAB, Zhang & Chen 2023, eq. 14).
    taus: the nodes of d_0, d_1, ... newest first. Gauss-Legendre quadrature (24 points: exact for the identity)."""
    time = time or (lambda tau: tau)
    half = (tau_next - taus[0]) / 2
    points = taus[0] + half * (_GAUSS_NODES + 1)
    s, s_nodes = time(points), [float(time(np.array(t))) for t in taus]
    weights = []
    for j, s_j in enumerate(s_nodes):
        basis = np.ones_like(points)
        for k, s_k in enumerate(s_nodes):
            if k != j:
                basis = basis * (s - s_k) / (s_j - s_k)
        weights.append(float(half * np.sum(_GAUSS_WEIGHTS * basis)))
    return weights


def deis_time(tau, sigma_min: float = 0.002, sigma_max: float = 80.0, eps_s: float = 1e-3):
    """The time t of the linear-beta VP SDE whose noise level sigma(t) = sqrt(e^{beta_d t^2/2 + beta_min t} - 1)
    runs from sigma_min at t = eps_s to sigma_max at t = 1 (Karras et al. 2022, Table 1 "VP"), the variable in which
    DEIS's tAB interpolates eps (Zhang & Chen 2023; ComfyUI's `deis.edm2t` with these defaults)."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(tau))) - beta_min) / beta_d


# ---------------------------------------------------------------- exponential integrators with phi_2


def exponential_heun_step(x: torch.Tensor, denoised: torch.Tensor, denoised_2: torch.Tensor, step: Step) -> torch.Tensor:
    """Exponential Heun in data prediction and log-SNR (ComfyUI `sample_exp_heun_2_x0`: SEEDS-2 with r = 1, eta = 0,
    phi_2; Gonzalez et al. 2023): x_0 linear in lambda between the estimates at the step's start (`denoised`) and at
    the DDIM-predicted end (`denoised_2`), integrated exactly: x' = (sigma'/sigma) x + alpha' (psi_0 D + (psi_1/h)
    (D_2 - D)), psi_0 = 1 - e^{-h}, psi_1 = h - psi_0. At h = inf (a start at alpha = 0) it is alpha' D_2 + sigma' x."""
    psi_0 = -math.expm1(-step.h)
    slope_weight = 1.0 - psi_0 / step.h if math.isfinite(step.h) else 1.0  # psi_1 / h
    x_next = step.alpha_next * (psi_0 * denoised + slope_weight * (denoised_2 - denoised))
    return x_next + (step.sigma_next / step.sigma) * x


# ---------------------------------------------------------------- ER-SDE (Cui et al. 2023)


def er_sde_noise_scale(tau: np.ndarray | float, kind: str = "er-sde") -> np.ndarray | float:
    """psi(tau) = phi(tau)/tau for ER-SDE's noise-scale functions phi (Cui et al. 2023, Sec. 4.2): "er-sde",
    phi = tau (e^{tau^0.3} + 10) (their default, ComfyUI's `default_er_sde_noise_scaler`); "ode", phi = tau
    (the probability-flow ODE: no noise); "reverse-sde", phi = tau^2 (the reverse-time SDE, DDPM-like)."""
    tau = np.asarray(tau, dtype=np.float64)
    if kind == "ode":
        return np.ones_like(tau)
    return tau if kind == "reverse-sde" else np.exp(tau**0.3) + 10.0


def er_sde_step(
    x: torch.Tensor, derivatives: list[torch.Tensor], step: Step, noise: torch.Tensor | None, kind: str = "er-sde",
) -> torch.Tensor:
    """VP ER-SDE-Solver (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs", eq. 20
    and Alg. 2; ComfyUI `sample_er_sde`), in tau = sigma/alpha with phi(tau) = tau psi(tau):
    x' = (sigma'/sigma)(psi'/psi) x + alpha' (1 - phi'/phi) x_0 + alpha' sum_k c_k x_0^(k) + sigma' sqrt(1 - (psi'/psi)^2) z,
    c_1 = (tau' - tau) + phi' int_{tau'}^{tau} dl/phi, c_2 = (tau' - tau)^2/2 + phi' int (l - tau)/phi dl.
    derivatives: [x_0, dx_0/dtau, d^2x_0/dtau^2] (ComfyUI's backward divided differences `denoised_d`,
    `denoised_u`); the integrals by Gauss-Legendre quadrature (ComfyUI: a 200-point Riemann sum)."""
    tau, tau_next = ve_level(step.alpha, step.sigma), ve_level(step.alpha_next, step.sigma_next)
    ratio = float(er_sde_noise_scale(tau_next, kind) / er_sde_noise_scale(tau, kind)) if math.isfinite(tau) else 0.0
    if kind == "ode" and not math.isfinite(tau):
        ratio = 1.0
    phi_ratio = ratio * tau_next / tau if math.isfinite(tau) else 0.0
    x_next = (step.sigma_next / step.sigma) * ratio * x + step.alpha_next * (1 - phi_ratio) * derivatives[0]
    if len(derivatives) > 1:
        half = (tau - tau_next) / 2  # Gauss-Legendre on [tau', tau]
        points = tau_next + half * (_GAUSS_NODES + 1)
        inverse_phi = 1.0 / (points * er_sde_noise_scale(points, kind))
        phi_next = tau_next * float(er_sde_noise_scale(tau_next, kind))
        dt = tau_next - tau
        c_1 = dt + phi_next * half * float(np.sum(_GAUSS_WEIGHTS * inverse_phi))
        x_next = x_next + step.alpha_next * c_1 * derivatives[1]
        if len(derivatives) > 2:
            c_2 = dt**2 / 2 + phi_next * half * float(np.sum(_GAUSS_WEIGHTS * (points - tau) * inverse_phi))
            x_next = x_next + step.alpha_next * c_2 * derivatives[2]
    if noise is not None and kind != "ode":
        x_next = x_next + step.sigma_next * math.sqrt(max(1.0 - ratio**2, 0.0)) * noise
    return x_next
