"""The update rules in `custom_schedulers.solvers`, on their own.

Local truncation error: from exact states on the probability-flow ODE of a Gaussian mixture
(exact x_0 predictions, reference trajectory from an 8th-order adaptive integrator at 1e-12),
one step of a rule of order p errs by O(h^(p+1)). We fit the log-log slope over step sizes
h = 0.4 .. 0.05 and accept +-0.35 around p+1: the fitted slope of a pure power law with a
next-order term of relative size h is within ~0.2 of the exponent on this range.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from custom_schedulers import solvers
from custom_schedulers.analytic import GaussianMixture

MIXTURE = GaussianMixture.random(num_components=3, dim=4, std=0.5, seed=0)
STEP_SIZES = [0.4, 0.2, 0.1, 0.05]
LAMBDA_START = -1.0  # log(alpha/sigma) of the newest history node


def vp(lam: float) -> tuple[float, float]:
    """(alpha, sigma) of a VP level with log-SNR 2*lam."""
    return 1 / math.sqrt(1 + math.exp(-2 * lam)), 1 / math.sqrt(1 + math.exp(2 * lam))


def trajectory(levels):
    """Exact ODE states at the given (alpha, sigma) levels, starting from a fixed state at the first."""
    generator = torch.Generator().manual_seed(0)
    x0 = MIXTURE.sample(16, generator)
    alpha, sigma = levels[0]
    x = alpha * x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    states = [x]
    for previous, level in zip(levels, levels[1:]):
        states.append(MIXTURE.ode_solution(states[-1], *previous, to=level, rtol=1e-12))
    return states


def local_error_slope(one_step_error) -> float:
    errors = [one_step_error(h) for h in STEP_SIZES]
    return float(np.polyfit(np.log(STEP_SIZES), np.log(errors), 1)[0])


def dpmpp_error(order: int, h: float) -> float:
    lams = [LAMBDA_START + (k - order + 1) * h for k in range(order + 1)]  # order history nodes + the target
    levels = [vp(lam) for lam in lams]
    states = trajectory(levels)
    history = [MIXTURE.denoise(x, *lv) for x, lv in zip(states[:-1], levels[:-1])][::-1]  # newest first
    x, (alpha, sigma), (alpha_next, sigma_next) = states[-2], levels[-2], levels[-1]
    step = solvers.Step(alpha, sigma, alpha_next, sigma_next, h)
    if order == 1:
        x_next = solvers.dpmpp_1_step(x, history[0], step)
    elif order == 2:
        x_next = solvers.dpmpp_2m_step(x, history[0], history[1], step, h_last=h)
    else:
        x_next = solvers.dpmpp_3m_step(x, history, step, h_last=h, h_last2=h)
    return float((x_next - states[-1]).abs().max())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_local_order(order):
    assert local_error_slope(lambda h: dpmpp_error(order, h)) == pytest.approx(order + 1, abs=0.35)


def ode_error(variable: str, heun: bool, h: float) -> float:
    """One Euler/Heun step in `variable` coordinates between VP levels h apart in lambda."""
    (a, s), (a2, s2) = vp(LAMBDA_START), vp(LAMBDA_START + h)
    x, exact = trajectory([(a, s), (a2, s2)])
    y, tau = solvers.to_ode_coordinates(x, a, s, variable)
    _, tau_next = solvers.to_ode_coordinates(x, a2, s2, variable)
    x0, eps = MIXTURE.posterior_means(x, a, s)
    d, dt = solvers.ode_derivative(x0, eps, variable), tau_next - tau
    y_next = solvers.euler_step(y, d, dt)
    if heun:
        x0_2, eps_2 = MIXTURE.posterior_means(solvers.from_ode_coordinates(y_next, a2, s2, variable), a2, s2)
        y_next = solvers.heun_step(y, d, solvers.ode_derivative(x0_2, eps_2, variable), dt)
    return float((solvers.from_ode_coordinates(y_next, a2, s2, variable) - exact).abs().max())


@pytest.mark.parametrize("variable", ["ve", "flow"])
@pytest.mark.parametrize("heun, order", [(False, 1), (True, 2)])
def test_euler_heun_local_order(variable, heun, order):
    assert local_error_slope(lambda h: ode_error(variable, heun, h)) == pytest.approx(order + 1, abs=0.35)


def test_first_order_rules_coincide():
    """DDIM (eta 0), Euler in sigma/alpha, Euler in flow time and DPM-Solver++ 1 are one update."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    (a, s), (a2, s2) = vp(-0.7), vp(0.4)
    x0, eps = MIXTURE.posterior_means(x, a, s)
    ddim = solvers.ddim_step(x0, eps, a2, s2)
    dpm = solvers.dpmpp_1_step(x, x0, solvers.Step(a, s, a2, s2, math.log(a2 / s2) - math.log(a / s)))
    for variable in ("ve", "flow"):
        y, tau = solvers.to_ode_coordinates(x, a, s, variable)
        _, tau_next = solvers.to_ode_coordinates(x, a2, s2, variable)
        euler = solvers.euler_step(y, solvers.ode_derivative(x0, eps, variable), tau_next - tau)
        torch.testing.assert_close(solvers.from_ode_coordinates(euler, a2, s2, variable), ddim, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpm, ddim, rtol=1e-12, atol=1e-12)


def test_ddpm_step_is_ddim_with_eta_one():
    """DDPM's posterior sample equals DDIM's eta = 1 step for the same noise (Song et al. 2021, Sec. 4.1)."""
    generator = torch.Generator().manual_seed(2)
    x, z = (torch.randn(8, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    (a, s), (a2, s2) = vp(-0.3), vp(0.2)
    x0, eps = MIXTURE.posterior_means(x, a, s)
    c = solvers.ddim_noise_std(solvers.Step.between(a, s, a2, s2), eta=1.0)
    torch.testing.assert_close(
        solvers.ddpm_step(x, x0, solvers.Step.between(a, s, a2, s2), z), solvers.ddim_step(x0, eps, a2, s2, c, z), rtol=1e-12, atol=1e-12
    )


def test_steps_from_zero_terminal_snr_are_finite():
    """At alpha = 0 (lambda = -inf, h = inf) the DPM-Solver++ and DDIM steps reduce to alpha' x_0 + sigma' eps."""
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0, eps = MIXTURE.posterior_means(x, 0.0, 1.0)
    a2, s2 = vp(-2.0)
    expected = a2 * x0 + s2 * eps
    torch.testing.assert_close(solvers.dpmpp_1_step(x, x0, solvers.Step(0.0, 1.0, a2, s2, math.inf)), expected)
    torch.testing.assert_close(solvers.ddim_step(x0, eps, a2, s2), expected)
    y, tau = solvers.to_ode_coordinates(x, 0.0, 1.0, "flow")
    _, tau_next = solvers.to_ode_coordinates(x, a2, s2, "flow")
    flow = solvers.euler_step(y, solvers.ode_derivative(x0, eps, "flow"), tau_next - tau)
    torch.testing.assert_close(solvers.from_ode_coordinates(flow, a2, s2, "flow"), expected)


def test_consistency_boundary_condition():
    c_skip, c_out = solvers.consistency_boundary(0.0)
    assert (c_skip, c_out) == (1.0, 0.0)  # the consistency function is the identity at t = 0
    c_skip, c_out = solvers.consistency_boundary(999.0)
    assert c_skip == pytest.approx(0.25 / (9990.0**2 + 0.25)) and c_out == pytest.approx(1.0, abs=1e-8)


# ---------------------------------------------------------------- Adams-Bashforth weights, exponential Heun, ER-SDE


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_adams_bashforth_weights_integrate_polynomials_exactly(order):
    """sum_j w_j p(tau_j) = int_{tau_0}^{tau'} p for every polynomial of degree < order, on uneven nodes; with a
    time map s(tau), for every polynomial in s (DEIS's tAB)."""
    taus, tau_next = [5.0, 8.0, 13.0, 21.0][:order], 3.0
    for k in range(order):
        weights = solvers.adams_bashforth_weights(taus, tau_next)
        assert sum(w * t**k for w, t in zip(weights, taus)) == pytest.approx((tau_next ** (k + 1) - taus[0] ** (k + 1)) / (k + 1))
        weights = solvers.adams_bashforth_weights(taus, tau_next, solvers.deis_time)
        s = lambda tau: float(solvers.deis_time(np.array(tau)))  # noqa: E731
        grid = np.linspace(tau_next, taus[0], 20001)
        exact = -np.trapezoid(solvers.deis_time(grid) ** k, grid)
        assert sum(w * s(t) ** k for w, t in zip(weights, taus)) == pytest.approx(exact, rel=1e-6)


def test_ipndm_weights_are_the_adams_bashforth_weights_on_even_steps():
    for order, weights in solvers.IPNDM_WEIGHTS.items():
        exact = solvers.adams_bashforth_weights([5.0 + k for k in range(order)], 4.0)
        assert [-w for w in weights] == pytest.approx(exact)


def test_deis_time_is_the_vp_fit():
    """t(sigma_min = 0.002) = 1e-3 and t(sigma_max = 80) = 1 (Karras et al. 2022's VP SDE fit, ComfyUI's edm2t)."""
    assert float(solvers.deis_time(np.array(0.002))) == pytest.approx(1e-3, rel=1e-6)
    assert float(solvers.deis_time(np.array(80.0))) == pytest.approx(1.0, rel=1e-9)


def test_exponential_heun_is_exact_for_x0_linear_in_lambda():
    """x_0(lambda) = a + b lambda: the ODE x' = (sigma'/sigma) x + alpha' int e^{lambda - lambda'} x_0 dlambda is
    solved exactly by the step (both estimates exact)."""
    lam, lam_next = -0.5, 1.2
    (alpha, sigma), (alpha_next, sigma_next) = vp(lam), vp(lam_next)
    step = solvers.Step.between(alpha, sigma, alpha_next, sigma_next)
    a, b, x = (torch.tensor([v], dtype=torch.float64) for v in (0.3, -0.7, 1.1))
    result = solvers.exponential_heun_step(x, a + b * lam, a + b * lam_next, step)
    v = np.linspace(lam, lam_next, 200001)
    integral = np.trapezoid(np.exp(v - lam_next) * (0.3 - 0.7 * v), v)
    exact = sigma_next / sigma * 1.1 + alpha_next * integral
    assert float(result) == pytest.approx(exact, rel=1e-8)


def test_er_sde_with_the_ode_noise_scale_is_ddim_and_keeps_the_marginal_std():
    """phi(tau) = tau: first stage = DDIM (no noise); the default phi: x' = alpha' x_0 + sigma' z from tau = inf, and
    for x = alpha x_0 + sigma eps the step's noise makes the std of x' - alpha' x_0 equal sigma' (a marginal step)."""
    alpha, sigma = vp(-0.3)
    alpha_next, sigma_next = vp(0.4)
    step = solvers.Step.between(alpha, sigma, alpha_next, sigma_next)
    x0, eps = torch.zeros(200_000, dtype=torch.float64), torch.randn(200_000, generator=torch.Generator().manual_seed(0),
                                                                     dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    ddim = solvers.ddim_step(x0, eps, alpha_next, sigma_next)
    torch.testing.assert_close(solvers.er_sde_step(x, [x0], step, None, "ode"), ddim)
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for kind in ("er-sde", "reverse-sde"):
        assert float(solvers.er_sde_step(x, [x0], step, z, kind).std()) == pytest.approx(sigma_next, rel=0.01)
    start = solvers.Step.between(0.0, 1.0, alpha_next, sigma_next)
    torch.testing.assert_close(solvers.er_sde_step(eps, [x0 + 0.5], start, z, "er-sde"), alpha_next * (x0 + 0.5) + sigma_next * z)
