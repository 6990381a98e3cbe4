"""Gaussian-mixture data whose denoiser and probability-flow ODE solution are known exactly.

Used by the tests (convergence orders) and `benchmarks/sampler_accuracy.py`: with
x_0 ~ sum_k w_k N(mu_k, s^2 I) and x_t = alpha x_0 + sigma eps, the posterior mean
E[x_0 | x_t] is closed-form (Bayes over the components), so every prediction type is too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import parameterization


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture: means (K, D), common std, weights (K,)."""

    means: torch.Tensor
    std: float
    weights: torch.Tensor

    @classmethod
    def random(cls, num_components: int, dim: int, std: float = 0.3, spread: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
        weights = torch.rand(num_components, generator=g, dtype=torch.float64) + 0.5
        return cls(means=means, std=std, weights=weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.std * noise

    def posterior_means(self, x_t: torch.Tensor, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x_0 | x_t], E[eps | x_t]) at noise level (alpha, sigma); x_t is (N, D).

        x_t | k ~ N(alpha mu_k, v I) with v = alpha^2 s^2 + sigma^2, so p(k | x_t) is a softmax and
        E[x_0 | x_t, k] = mu_k + (alpha s^2 / v)(x_t - alpha mu_k), E[eps | x_t, k] = (sigma / v)(x_t - alpha mu_k).
        """
        x = x_t.to(torch.float64)
        var = alpha**2 * self.std**2 + sigma**2
        residual = x[:, None, :] - alpha * self.means[None]  # (N, K, D)
        logits = torch.log(self.weights)[None] - (residual**2).sum(-1) / (2 * var)
        resp = torch.softmax(logits, dim=1)[..., None]
        x0 = (resp * (self.means[None] + (alpha * self.std**2 / var) * residual)).sum(1)
        eps = (resp * (sigma / var) * residual).sum(1)
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    def denoise(self, x_t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x_0 | x_t]."""
        return self.posterior_means(x_t, alpha, sigma)[0]

    def model_output(self, x_t: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
        """What a perfect network of `prediction_type` outputs at (alpha, sigma)."""
        x0, eps = self.posterior_means(x_t, alpha, sigma)
        return parameterization.target(prediction_type, x0, eps, alpha, sigma)

    def ode_solution(
        self, x_start: torch.Tensor, alpha: float, sigma: float, to: tuple[float, float] = (1.0, 0.0),
        rtol: float = 1e-11,
    ) -> torch.Tensor:
        """The sample at noise level `to` = (alpha_end, sigma_end) (default: x_0 at sigma = 0) reached by
        the probability-flow ODE from x_start at (alpha, sigma), integrated in flow
        coordinates y = x/(alpha+sigma), s = sigma/(alpha+sigma), dy/ds = E[eps - x_0 | y]
        (finite also at alpha = 0), with an adaptive 8th-order Runge-Kutta (scipy DOP853)."""
        from scipy.integrate import solve_ivp

        shape = x_start.shape
        y0 = (x_start.to(torch.float64) / (alpha + sigma)).reshape(-1).numpy()

        def velocity(s, y):
            x0, eps = self.posterior_means(torch.from_numpy(y).reshape(shape), 1.0 - s, s)
            return (eps - x0).reshape(-1).numpy()  # u = E[eps - x_0 | y]

        alpha_end, sigma_end = to
        s0, s_end = sigma / (alpha + sigma), sigma_end / (alpha_end + sigma_end)
        sol = solve_ivp(velocity, (s0, s_end), y0, method="DOP853", rtol=rtol, atol=rtol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).reshape(shape) * (alpha_end + sigma_end)
