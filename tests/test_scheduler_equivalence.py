"""Our samplers against diffusers' own schedulers and k-diffusion's sampling functions.

Identical model (a deterministic toy function of the model input and timestep), identical
start and identical noise (same generator): the model inputs at every step and the final
sample must agree to 1e-5. Both sides keep the sample in the model's coordinates at the
model input (diffusers' Euler keeps x/alpha internally, but `scale_model_input` maps it back).
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from scheduler_helpers import BASE_CONFIG, load_k_diffusion_sampling, sample_loop, seeded

from custom_schedulers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlusSampler,
    DPMSolverPlusPlusSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LCMSampler,
    RectifiedFlowEulerSampler,
    RectifiedFlowHeunSampler,
    UniPCSampler,
)

# (ours, our options, diffusers class, its options, its step() kwargs, spacings where diffusers spaces as we do)
PAIRS = {
    "DDPM": (DDPMSampler, {}, diffusers.DDPMScheduler, {"variance_type": "fixed_small"}, {}, ("trailing", "leading")),
    "DDIM eta=0": (DDIMSampler, {"eta": 0.0}, diffusers.DDIMScheduler, {"set_alpha_to_one": True}, {"eta": 0.0},
                   ("trailing", "leading")),
    "DDIM eta=1": (DDIMSampler, {"eta": 1.0}, diffusers.DDIMScheduler, {"set_alpha_to_one": True}, {"eta": 1.0},
                   ("trailing", "leading")),
    "DPM-Solver++ 2M": (DPMSolverPlusPlusSampler, {"solver_order": 2}, diffusers.DPMSolverMultistepScheduler,
                        {"solver_order": 2}, {}, ("trailing",)),
    "SDE-DPM-Solver++ 2M": (DPMSolverPlusPlusSDESampler, {}, diffusers.DPMSolverMultistepScheduler,
                            {"algorithm_type": "sde-dpmsolver++"}, {}, ("trailing",)),
    "Euler": (EulerSampler, {}, diffusers.EulerDiscreteScheduler, {}, {}, ("trailing", "leading")),
    "Euler a": (EulerAncestralSampler, {}, diffusers.EulerAncestralDiscreteScheduler, {}, {}, ("trailing", "leading")),
    "LCM": (LCMSampler, {}, diffusers.LCMScheduler, {}, {}, ("trailing", "leading")),  # both: LCM's own grid
}
CASES = [
    pytest.param(name, spacing, prediction_type, id=f"{name}-{spacing}-{prediction_type}")
    for name, pair in PAIRS.items()
    for spacing in pair[-1]
    for prediction_type in ("epsilon", "v_prediction")
]


def _x_T(shape=(2, 4, 8, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _compare_with_diffusers(ours, theirs, num_steps, step_kwargs, **set_timesteps_kwargs):
    theirs.set_timesteps(num_steps, **set_timesteps_kwargs)
    their_inputs, their_final = sample_loop(theirs, _x_T() * theirs.init_noise_sigma, step_kwargs=seeded(**step_kwargs))
    ours.set_timesteps(num_steps, **set_timesteps_kwargs)
    # Start from the same model input (diffusers' Euler scales its start by sigma_max, not 1/alpha).
    our_inputs, our_final = sample_loop(ours, their_inputs[0])
    torch.testing.assert_close(ours.timesteps.double(), theirs.timesteps.double().to(ours.timesteps.device))
    torch.testing.assert_close(our_inputs, their_inputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_final, their_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, spacing, prediction_type", CASES)
def test_matches_diffusers(name, spacing, prediction_type):
    ours_cls, our_options, theirs_cls, their_options, step_kwargs, _ = PAIRS[name]
    config = dict(BASE_CONFIG, timestep_spacing=spacing, steps_offset=int(spacing == "leading"),
                  prediction_type=prediction_type)
    ours = ours_cls.from_config(config, **our_options)
    theirs = theirs_cls.from_config(config, **their_options)
    _compare_with_diffusers(ours, theirs, 10, step_kwargs)


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unipc_matches_diffusers(solver_type, solver_order, prediction_type):
    config = dict(BASE_CONFIG, timestep_spacing="trailing", prediction_type=prediction_type)
    options = {"solver_type": solver_type, "solver_order": solver_order}
    theirs = diffusers.UniPCMultistepScheduler.from_config(config, **options)
    theirs.set_timesteps(10)
    their_inputs, their_final = sample_loop(theirs, _x_T(), step_kwargs={})  # its step takes no generator
    ours = UniPCSampler.from_config(config, **options)
    ours.set_timesteps(10)
    our_inputs, our_final = sample_loop(ours, _x_T())
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(our_inputs, their_inputs, rtol=1e-5, atol=1e-5)
    if solver_type == "bh1":  # diffusers' bh1 step into sigma = 0 is B(h) * 0 = -inf * 0 = nan
        assert torch.isnan(their_final).all() and torch.isfinite(our_final).all()
    else:
        torch.testing.assert_close(our_final, their_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps, original_steps", [(4, 50), (6, 50), (3, 8)])
def test_lcm_picks_the_distillation_grid_like_diffusers(num_steps, original_steps):
    """Step counts that do not divide original_inference_steps: nodes of the skipping-step grid, not a spacing."""
    config = dict(BASE_CONFIG, original_inference_steps=original_steps)
    theirs = diffusers.LCMScheduler.from_config(config)
    ours = LCMSampler.from_config(config)
    _compare_with_diffusers(ours, theirs, num_steps, {})


def test_lcm_without_original_steps_uses_the_timestep_spacing():
    from custom_schedulers.grids import spaced_timesteps

    ours = LCMSampler.from_config(dict(BASE_CONFIG, timestep_spacing="trailing"), original_inference_steps=None)
    ours.set_timesteps(4)
    torch.testing.assert_close(ours.timesteps.double(), spaced_timesteps("trailing", 4, 1000))
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCMSampler.from_config(BASE_CONFIG).set_timesteps(51)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_euler_matches_flow_match_euler(shift):
    flow_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow_config)
    ours = RectifiedFlowEulerSampler.from_config(flow_config)  # -> beta_schedule "flow", prediction_type "flow"
    s = torch.linspace(1.0, 0.05, 8, dtype=torch.float64)
    theirs.set_timesteps(sigmas=s.tolist())  # both shift custom sigmas (a FlowMatch config -> "flow-match" levels)
    their_inputs, their_final = sample_loop(theirs, _x_T(), scales_input=False)
    ours.set_timesteps(sigmas=s.tolist())
    our_inputs, our_final = sample_loop(ours, _x_T())
    torch.testing.assert_close(ours.timesteps.double(), theirs.timesteps.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(our_inputs, their_inputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_final, their_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [4, 10])
def test_rectified_flow_default_grid_is_flow_match_euler(num_steps):
    """SD3-style config (shift 3): the default grid is the stock one ([1000, 858, 602, 9] at 4 steps)."""
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(sd3)
    theirs.set_timesteps(num_steps)
    their_inputs, their_final = sample_loop(theirs, _x_T(), scales_input=False)
    ours = RectifiedFlowEulerSampler.from_config(sd3)
    ours.set_timesteps(num_steps)
    our_inputs, our_final = sample_loop(ours, _x_T())
    torch.testing.assert_close(ours.timesteps.double(), theirs.timesteps.double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_final, their_final, rtol=1e-5, atol=1e-5)
    ours_grid = RectifiedFlowEulerSampler.from_config(sd3, sigma_schedule="default")  # our training-grid option
    ours_grid.set_timesteps(4)
    assert ours_grid.timesteps.tolist() == [1000, 900, 750, 500]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_rectified_flow_spacings_on_a_flow_schedule(spacing):
    ours = RectifiedFlowEulerSampler.from_config(
        {"num_train_timesteps": 1000, "shift": 3.0}, sigma_schedule="default", timestep_spacing=spacing
    )
    ours.set_timesteps(5)
    assert ours.num_inference_steps == 5 and torch.isfinite(sample_loop(ours, _x_T())[1]).all()


def test_rectified_flow_heun_matches_flow_match_heun():
    flow_config = {"_class_name": "FlowMatchHeunDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    theirs = diffusers.FlowMatchHeunDiscreteScheduler.from_config(flow_config)
    ours = RectifiedFlowHeunSampler.from_config(flow_config)
    theirs.set_timesteps(6)
    s = theirs.sigmas[::2].double()  # Heun repeats each inner sigma
    their_inputs, their_final = sample_loop(theirs, _x_T(), step_kwargs={}, scales_input=False)  # no generator
    ours.set_timesteps(sigmas=s.tolist())
    our_inputs, our_final = sample_loop(ours, _x_T())
    torch.testing.assert_close(our_inputs, their_inputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_final, their_final, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- k-diffusion on the same sigma grid


K_SAMPLERS = {"Euler": ("sample_euler", EulerSampler), "Heun": ("sample_heun", HeunSampler),
              "DPM++ 2M": ("sample_dpmpp_2m", DPMSolverPlusPlusSampler)}


def _denoiser(x_ve: torch.Tensor, sigma_ve) -> torch.Tensor:
    """A nonlinear denoiser D(x, sigma) in k-diffusion's (VE) coordinates."""
    sigma_ve = torch.as_tensor(sigma_ve, dtype=x_ve.dtype).reshape(-1, *([1] * (x_ve.ndim - 1)))
    c = 1 / (1 + sigma_ve**2)
    return torch.tanh(x_ve * c.sqrt()) * 0.8 + 0.1 * x_ve * c


@pytest.mark.parametrize("name", list(K_SAMPLERS))
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_matches_k_diffusion(name, sigma_schedule):
    k_sampling = load_k_diffusion_sampling()
    k_function, ours_cls = K_SAMPLERS[name]
    ours = ours_cls.from_config(dict(BASE_CONFIG, prediction_type="sample", sigma_schedule=sigma_schedule))
    ours.set_timesteps(12)
    sigmas_ve = (ours.grid.sigma / ours.grid.alpha).float()  # the same grid, ending in 0
    x_T = _x_T(seed=3)
    k_final = getattr(k_sampling, k_function)(
        lambda x, sigma: _denoiser(x, sigma), x_T * sigmas_ve[0], sigmas_ve, disable=True
    )
    x = x_T * sigmas_ve[0] / (1 + sigmas_ve[0] ** 2).sqrt()  # the same start: k-diffusion's x times alpha
    for i, t in enumerate(ours.timesteps):
        alpha, sigma = ours.noise_level_at(i)
        x = ours.step(_denoiser(x / alpha, sigma / alpha), t, x).prev_sample
    torch.testing.assert_close(x, k_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, k_function", [("dpmpp-2s-a", "sample_dpmpp_2s_ancestral"),
                                              ("dpmpp-sde", "sample_dpmpp_sde"), ("dpmpp-3m-sde", "sample_dpmpp_3m_sde")])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_stochastic_samplers_match_k_diffusion(name, k_function, sigma_schedule):
    """Same grid, same denoiser, the same noise (k-diffusion's noise_sampler draws from a generator seeded as ours)."""
    from custom_schedulers import registry

    k_sampling = load_k_diffusion_sampling()
    ours = registry.build(name, dict(BASE_CONFIG, prediction_type="sample"), sigma_schedule=sigma_schedule)
    ours.set_timesteps(8)
    starts = (ours.grid.sigma / ours.grid.alpha)[:-1:ours.order]  # the step starts (midpoints sit between them)
    sigmas_ve = torch.cat([starts, starts.new_zeros(1)]).float()
    x_T = _x_T(seed=3)
    k_generator = torch.Generator().manual_seed(5)
    k_final = getattr(k_sampling, k_function)(
        _denoiser, x_T * sigmas_ve[0], sigmas_ve, disable=True,
        noise_sampler=lambda sigma, sigma_next: torch.randn(x_T.shape, generator=k_generator),
    )
    x = x_T * sigmas_ve[0] / (1 + sigmas_ve[0] ** 2).sqrt()
    generator = torch.Generator().manual_seed(5)
    for i, t in enumerate(ours.timesteps):
        alpha, sigma = ours.noise_level_at(i)
        x = ours.step(_denoiser(x / alpha, sigma / alpha), t, x, generator=generator).prev_sample
    torch.testing.assert_close(x, k_final, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ComfyUI's samplers: pinned outputs

# ComfyUI (commit 02159d8, comfy/k_diffusion/sampling.py and deis.py) run on this setup: `_denoiser`, x_T =
# randn(2, 3, float64, seed 3) times the first level, the levels of our grid (sigma/alpha, ending in 0) with
# 8 steps (5 for exp_heun_2_x0), ER-SDE's noise_sampler drawing randn(2, 3, float64) from a generator seeded 5.
COMFYUI_OUTPUTS = {
    ("ipndm", "karras", 8, "sample_ipndm"): [[0.45139421415916, 0.17539731300860517, 0.09381536041182739],
                                             [-0.4065145918507722, 0.04936470474343168, -0.5277571106328377]],
    # ComfyUI's ipndm_v: on uneven levels its order-3 and -4 weights are not the variable-step Adams-Bashforth ones
    # (an operator-precedence slip in its `temp` terms), and at order 4 even on even steps they are (57, -65, 43,
    # -11)/24 instead of (55, -59, 37, -9)/24 (its own `sample_ipndm`'s): compared at order 2 on Karras levels and
    # at order 3 on evenly spaced ("linear") levels.
    ("ipndm-v", "karras", 8, "sample_ipndm_v max_order=2"): [
        [0.4862478637431285, 0.1786748173373081, 0.09452553135424574],
        [-0.43546097763447095, 0.04957737742644558, -0.5679568224307979]],
    ("ipndm-v", "linear", 8, "sample_ipndm_v max_order=3"): [
        [0.5412374227889811, 0.17632001832895827, 0.09186398451760643],
        [-0.4746307104387838, 0.04797525187195292, -0.6406072535772267]],
    ("deis", "karras", 8, "sample_deis"): [[0.48444278261123724, 0.18384846017658468, 0.09775222410639887],
                                           [-0.43593220370996155, 0.05134411088974581, -0.5637828406418826]],
    ("res-multistep", "karras", 8, "sample_res_multistep"): [
        [0.46656758272036497, 0.18838047583884732, 0.1009865942976533],
        [-0.4245594416931481, 0.05316692414436942, -0.537810827750692]],
    ("exp-heun-2-x0", "karras", 5, "sample_exp_heun_2_x0"): [
        [0.4718540964463356, 0.17241829145331927, 0.09117202108037147],
        [-0.42200826646884715, 0.047812457048239415, -0.5521036828825876]],
    ("er-sde", "karras", 8, "sample_er_sde"): [[-0.08198292255432225, -0.5469541989017237, 0.19027426648482784],
                                               [-0.3345757101724148, -0.37262204380447334, 0.32364203525933694]],
}
# DEIS integrates its weights by a 10^4-point Riemann sum and ER-SDE by a 200-point one (ours: Gauss-Legendre).
COMFYUI_TOLERANCE = {"deis": 1e-5, "er-sde": 2e-3}


@pytest.mark.parametrize("key", list(COMFYUI_OUTPUTS), ids=lambda key: f"{key[0]}-{key[1]}")
def test_matches_comfyui(key):
    from custom_schedulers import registry

    name, sigma_schedule, num_steps, function = key
    options = {"max_order": int(function[-1])} if "max_order=" in function else {}
    ours = registry.build(name, dict(BASE_CONFIG, prediction_type="sample"), sigma_schedule=sigma_schedule, **options)
    ours.set_timesteps(num_steps)
    level = float(ours.grid.sigma[0] / ours.grid.alpha[0])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * level / (1 + level**2) ** 0.5
    generator = torch.Generator().manual_seed(5)
    for i, t in enumerate(ours.timesteps):
        alpha, sigma = ours.noise_level_at(i)
        x = ours.step(_denoiser(x / alpha, sigma / alpha), t, x, generator=generator).prev_sample
    tolerance = COMFYUI_TOLERANCE.get(name, 1e-12)
    torch.testing.assert_close(x, torch.tensor(COMFYUI_OUTPUTS[key], dtype=torch.float64), rtol=0, atol=tolerance)
