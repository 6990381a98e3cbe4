"""Prediction-type conversions: exact round trips for any (alpha, sigma), VP or flow."""

from __future__ import annotations

import pytest
import torch

from custom_schedulers import parameterization as P

LEVELS = [(0.9, (1 - 0.81) ** 0.5), (0.05, (1 - 0.0025) ** 0.5), (0.7, 0.3), (0.0, 1.0)]


# Every (level, type) pair except epsilon at alpha = 0, which is singular (test_epsilon_at_alpha_zero_is_refused).
ROUND_TRIPS = [(a, s, p) for a, s in LEVELS for p in P.PREDICTION_TYPES if not (p == "epsilon" and a == 0)]


@pytest.mark.parametrize("alpha, sigma, prediction_type", ROUND_TRIPS)
def test_round_trip(alpha, sigma, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    out = P.target(prediction_type, x0, eps, alpha, sigma)
    got_x0, got_eps = P.to_x0_eps(out, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_closed_forms_of_targets():
    x0, eps = torch.tensor([2.0]), torch.tensor([-1.0])
    assert P.target("v_prediction", x0, eps, 0.6, 0.8).item() == pytest.approx(0.6 * -1 - 0.8 * 2)  # Salimans & Ho
    assert P.target("flow", x0, eps, 0.6, 0.4).item() == pytest.approx(-3.0)  # u = eps - x0
    assert P.convert(P.target("flow", x0, eps, 0.6, 0.4), 0.6 * x0 + 0.4 * eps, 0.6, 0.4, "flow", "epsilon").item() \
        == pytest.approx(-1.0)


def test_per_sample_coefficients_broadcast():
    alpha, sigma = torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.8])
    x0, eps = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    x_t = alpha.view(2, 1, 1, 1) * x0
    torch.testing.assert_close(P.to_x0(P.target("v_prediction", x0, eps, alpha, sigma), x_t, alpha, sigma,
                                       "v_prediction"), x0)


def test_epsilon_at_alpha_zero_is_refused():
    with pytest.raises(ValueError, match="v_prediction"):
        P.to_x0(torch.zeros(2), torch.zeros(2), 0.0, 1.0, "epsilon")


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="valid values: epsilon, v_prediction, sample, flow"):
        P.target("x0", torch.zeros(1), torch.zeros(1), 1.0, 0.0)
