"""Our samplers converge to the exact probability-flow ODE solution, at the order their theory says.

Data: a Gaussian mixture (3 components, 4 dims), whose x_0 / eps / v / u predictions are exact
(`custom_schedulers.analytic`); reference: the ODE from the same start solved by an adaptive
8th-order Runge-Kutta at 1e-11. The model is evaluated at the sampler's own (alpha, sigma)
(`noise_level_at`), so only the solver's error remains. Samples are float64 (step math follows).

Grids: VP (SD's scaled-linear betas) with noise levels uniform in log-SNR from sigma/alpha = 14.6
down to 2e-4, so the final denoising step's own error (~(2e-4)^2) stays far below the solver's;
flow (rectified flow) with s uniform from 1 to 1/N. Slopes are least-squares fits of log error on
log N over N = 16, 32, 64, with tolerance +-0.35 (fits on this range wobble by ~0.2, see the
measured slopes in the module's history). DPM-Solver++ 3M starts with a first- and a second-order
step, whose errors (small, because x_0 barely moves at high noise) dominate only beyond N ~ 128,
while below N ~ 32 it is pre-asymptotic; over N = 32, 64, 128 we see its third order (measured
slopes 3.1 and 3.5 between neighbours) and accept 2.7-3.9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom_schedulers import grids, registry
from custom_schedulers.analytic import GaussianMixture

MIXTURE = GaussianMixture.random(num_components=3, dim=4, std=0.5, seed=0)
NOISE = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STEPS = [16, 32, 64]
BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
VP = dict(BASE, beta_schedule="scaled_linear", prediction_type="v_prediction")
FLOW = dict(BASE, beta_schedule="flow", prediction_type="flow")


def vp_sigmas(n: int) -> list[float]:
    return grids.exponential_levels(2e-4, 14.6, n).tolist()


def flow_sigmas(n: int) -> list[float]:
    return torch.linspace(1.0, 1.0 / n, n).tolist()


def sample(scheduler, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The denoising loop with the exact model of the mixture."""
    generator = torch.Generator().manual_seed(seed)
    for i, t in enumerate(scheduler.timesteps):
        alpha, sigma = scheduler.noise_level_at(i)
        model_output = MIXTURE.model_output(x, alpha, sigma, scheduler.config.prediction_type)
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample
    return x


def errors(name: str, config: dict, sigmas_for, steps=STEPS) -> list[float]:
    result = []
    for n in steps:
        scheduler = registry.build(name, config)
        scheduler.set_timesteps(sigmas=sigmas_for(n))
        reference = MIXTURE.ode_solution(NOISE, *scheduler.noise_level_at(0))
        result.append(float((sample(scheduler, NOISE) - reference).pow(2).mean().sqrt()))
    return result


def slope(errs: list[float], steps=STEPS) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])


ORDERS = [
    ("ddim", VP, vp_sigmas, 1.0), ("euler", VP, vp_sigmas, 1.0), ("rf-euler", VP, vp_sigmas, 1.0),
    ("heun", VP, vp_sigmas, 2.0), ("rf-heun", VP, vp_sigmas, 2.0), ("dpmpp-2m", VP, vp_sigmas, 2.0),
    ("rf-euler", FLOW, flow_sigmas, 1.0), ("rf-heun", FLOW, flow_sigmas, 2.0), ("ddim", FLOW, flow_sigmas, 1.0),
]


@pytest.mark.parametrize(
    "name, config, sigmas_for, order",
    [pytest.param(*case, id=f"{case[0]}-{'flow' if case[1] is FLOW else 'vp'}") for case in ORDERS],
)
def test_convergence_order(name, config, sigmas_for, order):
    errs = errors(name, config, sigmas_for)
    assert errs[-1] < errs[0]
    assert slope(errs) == pytest.approx(order, abs=0.35), errs


def test_dpmpp_3m_is_third_order_and_beats_2m():
    steps = [32, 64, 128]
    errs_3m = errors("dpmpp-3m", VP, vp_sigmas, steps)
    assert 2.7 <= slope(errs_3m, steps) <= 3.9, errs_3m
    assert errs_3m[-1] < errors("dpmpp-2m", VP, vp_sigmas, steps)[-1] / 4


# ---------------------------------------------------------------- any solver, any schedule, any prediction type

ODE_SAMPLERS = ["ddim", "euler", "heun", "rf-euler", "rf-heun", "dpmpp-2m", "dpmpp-3m", "ipndm", "ipndm-v", "deis",
                "res-multistep", "exp-heun-2-x0"]
SCHEDULES = {
    "scaled_linear": dict(BASE, beta_schedule="scaled_linear", prediction_type="v_prediction"),
    "cosine": dict(BASE, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    "zero-terminal-snr": dict(BASE, beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                              prediction_type="v_prediction"),
    "flow-shift-3": dict(BASE, beta_schedule="flow", shift=3.0, prediction_type="flow"),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("sigma_schedule", ["default", "karras"])
@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_every_ode_sampler_solves_every_schedule(name, sigma_schedule, schedule):
    """50 steps from the terminal level (alpha = 0 for zero SNR and flow) land within 0.13 RMS of the exact
    solution (data RMS ~1.1); first-order samplers on this grid measure <= 0.09, second/third-order <= 0.03."""
    scheduler = registry.build(name, SCHEDULES[schedule], sigma_schedule=sigma_schedule)
    scheduler.set_timesteps(50)
    reference = MIXTURE.ode_solution(NOISE, *scheduler.noise_level_at(0))
    error = float((sample(scheduler, NOISE) - reference).pow(2).mean().sqrt())
    assert error < 0.13


@pytest.mark.parametrize("name", ODE_SAMPLERS + ["ddpm", "dpmpp-2m-sde", "lcm", "er-sde"])
def test_prediction_types_give_the_same_samples(name):
    """The same exact model expressed as eps, x_0, v or u drives every sampler to the same samples."""
    results = {}
    for prediction_type in ("epsilon", "sample", "v_prediction", "flow"):
        scheduler = registry.build(name, SCHEDULES["scaled_linear"], prediction_type=prediction_type)
        scheduler.set_timesteps(12)
        results[prediction_type] = sample(scheduler, NOISE)
    for prediction_type, x in results.items():
        torch.testing.assert_close(x, results["epsilon"], rtol=1e-9, atol=1e-9, msg=prediction_type)


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("dpmpp-2m-sde", {}), ("ddim", {"eta": 1.0}), ("euler-a", {}),
                                           ("dpmpp-2s-a", {}), ("dpmpp-3m-sde", {}), ("er-sde", {})])
def test_stochastic_samplers_sample_the_data_distribution(name, options):
    """Ancestral / SDE sampling with the exact model: per-dimension mean and variance of 4000 samples match
    the mixture's (standard errors ~0.02 and ~3%; tolerances 0.06 and 12%). (DPM++ SDE, 100 steps: 0.87 of the
    variance in one coordinate where DDPM gets 0.88 from the same start noise, 0.96 at 200 steps; its match with
    k-diffusion, noise included, is `test_scheduler_equivalence.py::test_stochastic_samplers_match_k_diffusion`.)"""
    scheduler = registry.build(name, SCHEDULES["scaled_linear"], **options)
    scheduler.set_timesteps(100)
    x_T = torch.randn(4000, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = sample(scheduler, x_T)
    data = MIXTURE.sample(200_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.mean(0), data.mean(0), rtol=0, atol=0.06)
    torch.testing.assert_close(x.var(0), data.var(0), rtol=0.12, atol=0)


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc"])
def test_extrapolated_final_step_is_more_accurate(name):
    """Ending the grid at sigma/alpha = 0.1: extrapolating x_0 to sigma = 0 (in sigma^2) beats returning it."""
    errs = {}
    for final_step in ("denoise", "extrapolate"):
        scheduler = registry.build(name, VP, sigma_schedule="exponential", sigma_min=0.1, final_step=final_step)
        scheduler.set_timesteps(40)
        assert scheduler.noise_level_at(39)[1] / scheduler.noise_level_at(39)[0] == pytest.approx(0.1)
        reference = MIXTURE.ode_solution(NOISE, *scheduler.noise_level_at(0))
        errs[final_step] = float((sample(scheduler, NOISE) - reference).pow(2).mean().sqrt())
    assert errs["extrapolate"] < errs["denoise"] / 3, errs


def test_heun_stays_bounded_where_the_ve_trapezoid_diverges():
    """Cosine schedule, 3 Karras steps: from tau ~ 2e4 (and 80) straight to the data scale. Without the
    Euler fallback on steps shrinking tau > 8x the trapezoid errs by ~tau/2 (k-diffusion and diffusers do)."""
    class UnguardedHeun(type(registry.build("heun", VP))):
        min_corrected_ratio = 0.0

    cosine = SCHEDULES["cosine"]
    errs = {}
    for label, scheduler in (("ours", registry.build("heun", cosine, sigma_schedule="karras")),
                             ("unguarded", UnguardedHeun.from_config(dict(cosine, sigma_schedule="karras")))):
        scheduler.set_timesteps(3)
        reference = MIXTURE.ode_solution(NOISE, *scheduler.noise_level_at(0))
        errs[label] = float((sample(scheduler, NOISE) - reference).pow(2).mean().sqrt())
    assert errs["ours"] < 1.0 < 5 * errs["ours"] < errs["unguarded"], errs


@pytest.mark.parametrize("name, order", [("dpmpp-2m", 3.0), ("dpmpp-3m", 4.0)])
def test_adams_moulton_corrector_raises_the_order_by_one(name, order):
    """Measured slopes over N = 32, 64, 128: 2.6-2.9 for 2M + corrector, 4.3-4.0 for 3M + corrector."""
    steps = [32, 64, 128]
    errs = errors(name, dict(VP, corrector="adams-moulton"), vp_sigmas, steps)
    assert slope(errs, steps) == pytest.approx(order, abs=0.45), errs
    assert errs[-1] < errors(name, VP, vp_sigmas, steps)[-1] / 3


@pytest.mark.parametrize("variant", ["unipc", "unipc-bh1"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_unipc_has_order_p_plus_one(variant, solver_order):
    """UniPC-p is of order p + 1 (Zhao et al. 2023, Theorem 3.1). Measured slopes (bh2) over N = 32, 64, 128:
    1.79, 2.77, 4.18 (pre-asymptotic below: 1.67, 2.59 over 16-64; the warm-up and lower-order final steps)."""
    steps = [32, 64, 128]
    errs = errors(variant, dict(VP, solver_order=solver_order), vp_sigmas, steps)
    assert slope(errs, steps) == pytest.approx(solver_order + 1, abs=0.35), errs


@pytest.mark.parametrize("name", ["dpmpp-2s-a", "dpmpp-sde"])
def test_midpoint_samplers_without_noise_are_second_order(name):
    """eta = 0 leaves DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2): second order."""
    errs = errors(name, dict(VP, eta=0.0), vp_sigmas)
    assert slope(errs) == pytest.approx(2.0, abs=0.35), errs


def test_dpmpp_3m_sde_without_noise_is_second_order():
    """eta = 0: k-diffusion's 3M update with the halved second-derivative term (see `solvers.dpmpp_3m_step`), so
    second order, like diffusers' 3M; measured slopes 2.28 over N = 16-64, 2.48 over 32-128."""
    errs = errors("dpmpp-3m-sde", dict(VP, eta=0.0), vp_sigmas)
    assert slope(errs) == pytest.approx(2.25, abs=0.35), errs


# ---------------------------------------------------------------- iPNDM, DEIS, RES, exponential Heun, ER-SDE

WAVE_2_ORDERS = [  # (name, options, order, tolerance) on the VP grid over N = 32, 64, 128; measured slopes in the ids
    pytest.param("ipndm-v", {"max_order": 2}, 2.0, 0.4, id="ipndm-v-2:1.67"),  # 1.82, 1.94, 1.97 up to N = 512
    pytest.param("ipndm-v", {}, 4.0, 1.0, id="ipndm-v-4:3.13"),  # 2.57 over 16-64: its warm-up steps
    pytest.param("deis", {}, 3.0, 0.35, id="deis-3:2.75"),
    pytest.param("res-multistep", {}, 2.0, 0.35, id="res-multistep:2.05"),
    pytest.param("exp-heun-2-x0", {}, 2.0, 0.35, id="exp-heun-2-x0:1.90"),
    pytest.param("er-sde", {"noise_scale": "ode"}, 2.0, 0.35, id="er-sde-ode:2.04"),  # backward differences: 2nd order
]


@pytest.mark.parametrize("name, options, order, tolerance", WAVE_2_ORDERS)
def test_wave_2_convergence_order(name, options, order, tolerance):
    steps = [32, 64, 128]
    errs = errors(name, dict(VP, **options), vp_sigmas, steps)
    assert slope(errs, steps) == pytest.approx(order, abs=tolerance), errs


def test_ipndm_higher_order_beats_lower_order():
    steps = [128]
    assert errors("ipndm-v", VP, vp_sigmas, steps)[0] < errors("ipndm-v", dict(VP, max_order=2), vp_sigmas, steps)[0] / 10


def test_ipndm_weights_are_adams_bashforth_on_even_steps():
    """On evenly spaced levels (flow: s = 1, 1 - 1/N, ...) iPNDM's constant weights are the exact ones: same samples."""
    assert errors("ipndm", FLOW, flow_sigmas, [16]) == pytest.approx(errors("ipndm-v", FLOW, flow_sigmas, [16]), rel=1e-9)
