"""APG, CFG-Zero*, CFG++ and PAG: closed forms on an analytic Gaussian mixture, parity with the field, the pipeline.

The analytic model: the unconditional data is a Gaussian mixture, the conditional data its first
component; both denoisers are exact (`custom_schedulers.analytic`), so every guided target is known.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPAGPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from custom_schedulers import registry
from custom_schedulers.analytic import GaussianMixture
from ldm_pipeline import GenerationOptions, InvalidOptions, LatentTextToImagePipeline
from ldm_pipeline.guidance import Guidance, Guider
from ldm_pipeline.guidance_methods import GuidanceMethod, StepPoint, StepPoints, apg, cfg_zero_star
from ldm_pipeline.perturbed_attention import PerturbedAttention
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components

UNCOND = GaussianMixture.random(num_components=3, dim=16, std=0.4, seed=7)
COND = GaussianMixture(UNCOND.means[:1], UNCOND.std, torch.ones(1, dtype=torch.float64))
FLOW_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}
SMALL = {"width": 32, "height": 32, "num_inference_steps": 4, "progress_bar": False, "output_type": "np"}


def pair_at(x_t, alpha, sigma, prediction_type="epsilon"):
    """(uncond, cond) predictions of the exact denoisers, as a [N, 1, 4, 4] 'image' batch."""
    flat = x_t.reshape(x_t.shape[0], -1)
    preds = [m.model_output(flat, alpha, sigma, prediction_type).reshape(x_t.shape) for m in (UNCOND, COND)]
    return preds


def noisy(alpha, sigma, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    x0 = UNCOND.sample(n, g)
    return (alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)).reshape(n, 1, 4, 4)


# ---------------------------------------------------------------- APG (Sadat et al. 2024, Alg. 1)


def test_apg_parallel_plus_orthogonal_is_the_update_and_eta_one_is_cfg():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                  dtype=torch.float64)
    w = 5.0
    cfg = u + w * (c - u)
    torch.testing.assert_close(apg(u, c, w, eta=1.0, norm_threshold=0.0, momentum=None), cfg)
    orthogonal = (apg(u, c, w, eta=0.0, norm_threshold=0.0, momentum=None) - c) / (w - 1)
    parallel = (apg(u, c, w, eta=1.0, norm_threshold=0.0, momentum=None) - c) / (w - 1) - orthogonal
    torch.testing.assert_close(parallel + orthogonal, c - u)  # the decomposition is the update
    dims = (1, 2, 3)
    torch.testing.assert_close((orthogonal * c).sum(dims), torch.zeros(2, dtype=torch.float64))  # _|_ cond
    k = (parallel * c).sum(dims) / (c * c).sum(dims)  # parallel = k * cond
    torch.testing.assert_close(parallel, k.view(-1, 1, 1, 1) * c)
    half = apg(u, c, w, eta=0.5, norm_threshold=0.0, momentum=None)
    torch.testing.assert_close(half, c + (w - 1) * (orthogonal + 0.5 * parallel))


def test_apg_norm_threshold_and_negative_momentum():
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    g = torch.Generator().manual_seed(1)
    u1, c1, u2, c2 = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    r, w = 0.5, 4.0
    clipped = apg(u1, c1, w, eta=1.0, norm_threshold=r, momentum=None) - c1
    assert float(clipped.norm()) == pytest.approx((w - 1) * r)  # ||update|| clipped to r
    assert float((c1 - u1).norm()) > r
    unclipped = apg(u1, c1, w, eta=1.0, norm_threshold=1e9, momentum=None)
    torch.testing.assert_close(unclipped, u1 + w * (c1 - u1))  # r far above the update: CFG
    buffer = MomentumBuffer(-0.5)
    apg(u1, c1, w, eta=1.0, norm_threshold=0.0, momentum=buffer)
    second = apg(u2, c2, w, eta=1.0, norm_threshold=0.0, momentum=buffer)
    torch.testing.assert_close(second, c2 + (w - 1) * ((c2 - u2) - 0.5 * (c1 - u1)))  # running = d + beta * running


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_apg_in_the_guider_works_on_the_denoised_prediction(prediction_type):
    alpha, sigma = 0.6, 0.8
    x_t = noisy(alpha, sigma)
    uncond, cond = pair_at(x_t, alpha, sigma, prediction_type)
    guider = Guider(Guidance(scale=6.0, method=GuidanceMethod("apg", apg_momentum=0.0)), DDIMScheduler(), [500])
    point = StepPoint(x_t, alpha, sigma, prediction_type)
    x0_guided = point.x0_eps(guider.combine(point, uncond, cond, 6.0))[0]
    x0_u, x0_c = (m.denoise(x_t.reshape(3, -1), alpha, sigma).reshape(x_t.shape) for m in (UNCOND, COND))
    torch.testing.assert_close(x0_guided, apg(x0_u, x0_c, 6.0, 0.0, 15.0, None))


# ---------------------------------------------------------------- CFG-Zero* (Fan et al. 2025)


def test_cfg_zero_star_scale_closed_form():
    g = torch.Generator().manual_seed(2)
    u_u = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    dims = (1, 2, 3)
    v = v - ((v * u_u).sum(dims) / (u_u * u_u).sum(dims)).view(-1, 1, 1, 1) * u_u  # v _|_ u_u
    a = torch.tensor([2.5, -0.7], dtype=torch.float64).view(-1, 1, 1, 1)
    u_c = a * u_u + v  # s* = a
    torch.testing.assert_close(cfg_zero_star(u_u, u_c, 4.0), a * u_u + 4.0 * v, rtol=1e-5, atol=1e-5)  # float32 s*
    torch.testing.assert_close(cfg_zero_star(u_u, u_c, 1.0), u_c, rtol=1e-5, atol=1e-5)  # w = 1: conditional
    # s* minimises ||u_c - s u_u|| (least squares)
    for i in range(2):
        s_lsq = torch.linalg.lstsq(u_u[i].reshape(-1, 1), u_c[i].reshape(-1, 1)).solution.item()
        assert s_lsq == pytest.approx(a.flatten()[i].item(), rel=1e-6)


def test_cfg_zero_star_acts_on_the_velocity_for_every_prediction_type():
    alpha, sigma = 0.8, 0.6
    x_t = noisy(alpha, sigma, seed=3)
    x0_u, eps_u = (t.reshape(x_t.shape) for t in UNCOND.posterior_means(x_t.reshape(3, -1), alpha, sigma))
    x0_c, eps_c = (t.reshape(x_t.shape) for t in COND.posterior_means(x_t.reshape(3, -1), alpha, sigma))
    expected_u = cfg_zero_star(eps_u - x0_u, eps_c - x0_c, 5.0)  # the paper's velocity u = eps - x_0
    method = Guidance(scale=5.0, method=GuidanceMethod("cfg-zero*"))
    for prediction_type in ("epsilon", "v_prediction", "sample", "flow"):
        point = StepPoint(x_t, alpha, sigma, prediction_type)
        uncond, cond = pair_at(x_t, alpha, sigma, prediction_type)
        guided = Guider(method, DDIMScheduler(), [500]).combine(point, uncond, cond, 5.0)
        torch.testing.assert_close(point.velocity(guided), expected_u)


def test_cfg_zero_init_keeps_the_sample_in_flow_coordinates_and_runs_no_model():
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    guider = Guider(Guidance(scale=5.0, method=GuidanceMethod("cfg-zero*", cfg_zero_init_steps=2)), scheduler,
                    scheduler.timesteps)
    assert guider.passes[:3] == [(), (), ("uncond", "cond")]
    points = StepPoints(scheduler)
    t, t_next = scheduler.timesteps[:2]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pred, sample = guider.guide(0, {}, t, x, x)
    x_next = scheduler.step(pred, t, sample).prev_sample
    a, s = points.at(t, x).alpha, points.at(t, x).sigma
    a_next, s_next = points.at(t_next, x).alpha, points.at(t_next, x).sigma
    torch.testing.assert_close(x_next / (a_next + s_next), x / (a + s), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CFG++ (Chung et al. 2024)


def one_cfg_pp_step(scheduler, scale, x, t, prediction_type="epsilon", generator=None):
    """One step of `scheduler` with CFG++ from latents x at t on the analytic pair; also returns the point."""
    guider = Guider(Guidance(scale=scale, method=GuidanceMethod("cfg++")), scheduler, scheduler.timesteps)
    # stock FlowMatchEuler has no scale_model_input: its sample is the model input
    x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
    point = StepPoints(scheduler).at(t, x_in)
    uncond, cond = pair_at(x_in.double(), point.alpha, point.sigma, prediction_type)
    pred, sample = guider.guide(0, {"uncond": uncond.float(), "cond": cond.float()}, t, x_in, x)
    kwargs = {"generator": generator} if generator is not None else {}
    return scheduler.step(pred, t, sample, **kwargs).prev_sample, point, (uncond, cond)


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
    lambda: EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
    lambda: registry.build("ddim", SD15_SCHEDULER_CONFIG),
    lambda: registry.build("euler", SD15_SCHEDULER_CONFIG),
], ids=["DDIMScheduler", "EulerDiscreteScheduler", "ddim", "euler"])
@pytest.mark.parametrize("scale", [0.0, 0.4, 1.0])
def test_cfg_pp_step_renoises_the_guided_x0_with_the_unconditional_eps(make, scale):
    """x_next = alpha_next x0_lambda + sigma_next eps_uncond, x0_lambda = x0_u + lambda (x0_c - x0_u) (Alg. 1)."""
    scheduler = make()
    scheduler.set_timesteps(8)
    t, t_next = scheduler.timesteps[2], scheduler.timesteps[3]
    x = noisy(1.0, 1.0, seed=4).float() * scheduler.init_noise_sigma
    x_next, point, (uncond, cond) = one_cfg_pp_step(scheduler, scale, x, t)
    x0_u, eps_u = point.x0_eps(uncond)
    x0_c, _ = point.x0_eps(cond)
    next_point = StepPoints(scheduler).at(t_next, x)
    expected_vp = next_point.alpha * (x0_u + scale * (x0_c - x0_u)) + next_point.sigma * eps_u
    scale_next = next_point.alpha if scheduler.init_noise_sigma > 1 else 1.0  # Euler's latents are x_t / alpha
    torch.testing.assert_close(x_next.double() * scale_next, expected_vp, rtol=2e-4, atol=2e-4)


def test_cfg_pp_matches_comfyui_sample_euler_cfg_pp():
    """ComfyUI's loop (k-diffusion sigmas): denoised = D_u + w (D_c - D_u); x = denoised + sigma_next (x - D_u)/sigma."""
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(6)
    x = noisy(1.0, 1.0, seed=5).float() * scheduler.init_noise_sigma
    ours, reference = x.clone(), x.double().clone()
    for i, t in enumerate(scheduler.timesteps):
        ours, _, _ = one_cfg_pp_step(scheduler, 0.7, ours, t)
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        alpha = 1 / math.sqrt(1 + sigma**2)
        d_u, d_c = (m.denoise((reference * alpha).reshape(3, -1), alpha, sigma * alpha).reshape(x.shape)
                    for m in (UNCOND, COND))
        denoised = d_u + 0.7 * (d_c - d_u)
        reference = denoised + sigma_next * (reference - d_u) / sigma
    torch.testing.assert_close(ours.double(), reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("make", [lambda: EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                  lambda: registry.build("euler-a", SD15_SCHEDULER_CONFIG)],
                         ids=["EulerAncestralDiscreteScheduler", "euler-a"])
def test_cfg_pp_euler_ancestral_matches_comfyui_with_the_same_noise(make):
    """sample_euler_ancestral_cfg_pp: x = denoised + sigma_down (x - D_u)/sigma + sigma_up * noise."""
    scheduler, fresh = make(), make()
    for s in (scheduler, fresh):
        s.set_timesteps(5)
    x = noisy(1.0, 1.0, seed=6).float() * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    ours, point, (uncond, cond) = one_cfg_pp_step(scheduler, 0.5, x, t, generator=torch.Generator().manual_seed(9))
    zero = torch.zeros_like(x)  # x = 0 with eps = 0: the step returns its noise term sigma_up * z alone
    fresh.scale_model_input(zero, t)
    noise_term = fresh.step(zero, t, zero, generator=torch.Generator().manual_seed(9)).prev_sample.double()
    nxt = StepPoints(scheduler).at(scheduler.timesteps[1], x)
    to_vp = nxt.alpha if scheduler.init_noise_sigma > 1 else 1.0  # stock Euler a keeps x / alpha, ours x
    sigma, sigma_next = point.sigma / point.alpha, nxt.sigma / nxt.alpha  # k-diffusion's sigmas
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    assert float(noise_term.std()) * to_vp == pytest.approx(nxt.alpha * sigma_up, rel=0.5)
    (d_u, eps_u), (d_c, _) = point.x0_eps(uncond), point.x0_eps(cond)  # eps_u = (x - D_u) / sigma
    expected_vp = nxt.alpha * (d_u + 0.5 * (d_c - d_u) + sigma_down * eps_u) + noise_term * to_vp
    torch.testing.assert_close(ours.double() * to_vp, expected_vp, rtol=1e-3, atol=1e-3)


def test_cfg_pp_ddpm_is_the_posterior_step_from_the_guided_x0_and_unconditional_eps():
    """DDPM (fixed_small): x_next = sqrt(abar') x0_g + sqrt(1 - abar' - var) eps_u + sqrt(var) z, var = beta~_t."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    t, t_prev = (int(v) for v in scheduler.timesteps[3:5])
    x = noisy(0.6, 0.8, seed=10).float()
    x_next, point, (uncond, cond) = one_cfg_pp_step(scheduler, 0.7, x, t, generator=torch.Generator().manual_seed(3))
    (x0_u, eps_u), (x0_c, _) = point.x0_eps(uncond), point.x0_eps(cond)
    abar, abar_prev = (float(scheduler.alphas_cumprod[i]) for i in (t, t_prev))
    var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    z = randn_tensor(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype).double()
    expected = (math.sqrt(abar_prev) * (x0_u + 0.7 * (x0_c - x0_u)) + math.sqrt(1 - abar_prev - var) * eps_u
                + math.sqrt(var) * z)
    torch.testing.assert_close(x_next.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG),
                                  lambda: registry.build("rf-euler", {**FLOW_CONFIG, "beta_schedule": "flow",
                                                                      "prediction_type": "flow"})],
                         ids=["FlowMatchEulerDiscreteScheduler", "rf-euler"])
def test_cfg_pp_flow_euler_renoises_with_the_unconditional_eps(make):
    scheduler = make()
    scheduler.set_timesteps(5)
    x = noisy(0.5, 0.5, seed=8).float()
    t = scheduler.timesteps[1]
    x_next, point, (uncond, cond) = one_cfg_pp_step(scheduler, 0.6, x, t, prediction_type="flow")
    (x0_u, eps_u), (x0_c, _) = point.x0_eps(uncond), point.x0_eps(cond)
    s_next = float(StepPoints(scheduler).at(scheduler.timesteps[2], x).sigma)
    expected = (1 - s_next) * (x0_u + 0.6 * (x0_c - x0_u)) + s_next * eps_u
    torch.testing.assert_close(x_next.double(), expected, rtol=1e-4, atol=1e-4)


def test_cfg_pp_refuses_a_multistep_sampler():
    scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match=r"CFG\+\+ .*DPMSolverMultistepScheduler is not one. Choose one of: ddim"):
        Guider(Guidance(method=GuidanceMethod("cfg++")), scheduler, [999])


def test_cfg_pp_runs_the_unconditional_pass_at_scale_one():
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert Guider(Guidance(scale=1.0, method=GuidanceMethod("cfg++")), scheduler, [999, 500]).passes == [
        ("uncond", "cond")] * 2
    assert Guider(Guidance(scale=1.0), scheduler, [999, 500]).passes == [("cond",)] * 2


# ---------------------------------------------------------------- the pipeline (tiny model)


@pytest.fixture(scope="module")
def components():
    return tiny_sd_components()


@pytest.fixture(scope="module")
def pipe(components):
    return LatentTextToImagePipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                    "scheduler")})


METHOD_CASES = [
    {"guidance_method": "apg"},
    {"guidance_method": "apg", "apg_eta": 0.3, "apg_norm_threshold": 2.0, "apg_momentum": 0.0},
    {"guidance_method": "cfg-zero*", "cfg_zero_init_steps": 2},
    {"guidance_method": "cfg++", "guidance_scale": 0.8},
    {"pag_scale": 2.5},
    {"pag_scale": 2.5, "pag_layers": ["down_blocks.1", "up"], "guidance_method": "cfg-zero*"},
]


@pytest.mark.parametrize("settings", METHOD_CASES, ids=lambda s: "+".join(f"{k}={v}" for k, v in s.items()))
def test_each_method_changes_the_image_and_reproduces_from_its_recipe(pipe, settings):
    plain = pipe("a red circle", seed=4, **SMALL).images
    out = pipe("a red circle", seed=4, **{**SMALL, **settings})
    assert np.abs(out.images - plain).max() > 1e-3
    recipe = out.recipes[0]
    options = GenerationOptions.from_recipe(recipe, progress_bar=False, output_type="np")
    for key, value in settings.items():
        assert options.kwargs()[key] == value
    again = pipe(**options.kwargs())
    np.testing.assert_array_equal(again.images, out.images)
    assert not any("PAG" in type(p).__name__ for p in pipe.unet.attn_processors.values())


def test_evaluations_count_each_pass(pipe):
    assert pipe("a circle", seed=1, pag_scale=2.0, **SMALL).unet_evaluations == 3 * 4
    assert pipe("a circle", seed=1, pag_scale=2.0, guidance_scale=1.0, **SMALL).unet_evaluations == 2 * 4
    zero = pipe("a circle", seed=1, guidance_method="cfg-zero*", cfg_zero_init_steps=1, **SMALL)
    assert zero.unet_evaluations == 2 * 3


def test_apg_with_eta_one_and_no_threshold_or_momentum_is_cfg(pipe):
    plain = pipe("a red circle", seed=2, **SMALL).images
    same = pipe("a red circle", seed=2, guidance_method="apg", apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0,
                **SMALL).images
    np.testing.assert_allclose(same, plain, atol=1e-5)


def test_pag_equals_stock_stable_diffusion_pag_pipeline(components):
    keys = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    stock = StableDiffusionPAGPipeline(**components, pag_applied_layers=["mid", "down_blocks.1"],
                                       requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    ours = LatentTextToImagePipeline(**{k: components[k] for k in keys})
    for guidance_scale in (5.0, 1.0):  # with CFG ([uncond; cond; perturbed]) and without ([cond; perturbed])
        expected = stock("a red circle", negative_prompt="blurry", guidance_scale=guidance_scale, pag_scale=3.0,
                         num_inference_steps=4, width=32, height=32, output_type="np",
                         generator=[torch.Generator().manual_seed(s) for s in (21, 22)], num_images_per_prompt=2).images
        got = ours("a red circle", negative_prompt="blurry", guidance_scale=guidance_scale, pag_scale=3.0,
                   pag_layers=["mid", "down_blocks.1"], seed=21, num_images_per_prompt=2, **SMALL).images
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pag_layers_that_match_nothing_are_refused_and_the_unet_is_left_alone(pipe):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="pag_layers: Cannot find PAG layer to set attention processor for: nowhere"):
        pipe("a circle", seed=1, pag_scale=2.0, pag_layers=["nowhere"], **SMALL)
    assert pipe.unet.attn_processors == before


def test_cfg_pp_with_an_unsupported_sampler_is_refused_in_the_pipeline(components):
    pipe = LatentTextToImagePipeline(**{**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                        "scheduler": registry.build("dpmpp-2m", SD15_SCHEDULER_CONFIG)})
    with pytest.raises(ValueError, match=r"CFG\+\+ .*DPMSolverPlusPlusSampler is not one"):
        pipe("a circle", seed=1, guidance_method="cfg++", **SMALL)


def test_sdxl_runs_each_method_with_its_added_conditioning():
    from ldm_pipeline.sdxl import LatentSDXLPipeline
    from training.tiny_models import tiny_sdxl_components

    components = tiny_sdxl_components()
    keys = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    sdxl = LatentSDXLPipeline(**{k: components[k] for k in keys})
    plain = sdxl("a red circle", seed=3, **SMALL).images
    for settings in ({"guidance_method": "apg", "pag_scale": 2.0}, {"guidance_method": "cfg++", "guidance_scale": 0.6}):
        out = sdxl("a red circle", seed=3, **{**SMALL, **settings})
        assert np.isfinite(out.images).all() and np.abs(out.images - plain).max() > 1e-3


def test_recipe_of_plain_cfg_is_unchanged(pipe):
    guidance = pipe("a circle", seed=1, **SMALL).recipes[0]["guidance"]
    assert set(guidance) == {"scale", "schedule", "min_scale", "interval", "rescale"}


def test_method_parameters_are_checked():
    with pytest.raises(InvalidOptions, match="Unknown guidance method"):
        GenerationOptions(prompt="x", guidance_method="cfg+").check()
    assert PerturbedAttention(2.0).describe() == {"scale": 2.0, "layers": ["mid"]}


# ---------------------------------------------------------------- infotext, CLI, service


@pytest.mark.parametrize("settings, text", [
    ({"guidance_method": "cfg++", "guidance_scale": 0.8}, "Sampler: DDIM CFG++"),
    ({"guidance_method": "apg", "apg_eta": 0.25}, "Guidance method: apg, APG eta: 0.25, APG norm threshold: 15.0, "
                                                  "APG momentum: -0.5"),
    ({"guidance_method": "cfg-zero*", "cfg_zero_init_steps": 2}, "Guidance method: cfg-zero*, Zero-init steps: 2"),
    ({"pag_scale": 3.0}, "pag_enabled: True, pag_scale: 3.0, pag_block: middle, pag_block_id: 0"),
    ({"pag_scale": 3.0, "pag_layers": ["mid", "up"]}, 'pag_enabled: True, pag_scale: 3.0, PAG layers: "[\\"mid\\", '
                                                     '\\"up\\"]"'),
])
def test_infotext_names_the_method_and_reads_back(pipe, settings, text):
    from ldm_pipeline import metadata

    recipe = pipe("a red circle", seed=4, **{**SMALL, "num_inference_steps": 3, **settings}).recipes[0]
    infotext = metadata.format_parameters(recipe)
    assert text in infotext
    options = metadata.parameters_to_options(metadata.parse_parameters(infotext))
    assert {k: options[k] for k in settings} == settings


def test_forge_pag_infotext_of_another_block_is_not_guessed():
    from ldm_pipeline import metadata

    params = metadata.parse_parameters("a cat\nSteps: 20, Sampler: Euler a CFG++, CFG scale: 1.5, Seed: 1, "
                                       "pag_enabled: True, pag_scale: 3, pag_block: input, pag_block_id: 4")
    options = metadata.parameters_to_options(params)
    assert options["guidance_method"] == "cfg++" and options["scheduler"] == "euler-a" and "pag_scale" not in options


def test_cli_generates_with_a_method_and_refuses_cfg_pp_with_a_multistep_sampler(components, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from ldm_pipeline import metadata
    from ldm_pipeline.generate import main

    folder = tmp_path / "tiny"
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(str(folder))
    common = ["a circle", "--model", str(folder), "--steps", "3", "--width", "32", "--height", "32"]
    assert main([*common, "--out", str(tmp_path / "ok"), "--guidance-method", "apg", "--apg-eta", "0.2",
                 "--pag-scale", "2", "--pag-layers", "mid", "up"]) == 0
    guidance = metadata.read_png(next((tmp_path / "ok").glob("*.png"))).recipe["guidance"]
    assert guidance["method"]["apg_eta"] == 0.2 and guidance["pag"] == {"scale": 2.0, "layers": ["mid", "up"]}
    assert main([*common, "--out", str(tmp_path / "bad"), "--guidance-method", "cfg++", "--scheduler",
                 "dpmpp-2m"]) == 1
    assert "CFG++ (guidance_method='cfg++') renoises with the unconditional" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.png"))
