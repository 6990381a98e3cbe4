"""Stock diffusers call arguments on our pipeline: the same images as stock SD / img2img / inpainting pipelines
built from the same tiny components, with the same scheduler object and the same arguments.

Deliberate differences, set explicitly here: our guidance_rescale defaults to 0.7 on zero-terminal-SNR
schedules (stock: 0), so the ZTSNR case passes it to both.
"""

import functools

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.callbacks import SDCFGCutoffCallback
from PIL import Image

from custom_schedulers import registry
from ldm_pipeline import LatentTextToImagePipeline
from ldm_pipeline.metadata import recipe_to_options
from ldm_pipeline.options import GenerationOptions, InvalidOptions
from ldm_pipeline.prompts import encode_pair
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_ip_adapter, tiny_sd_components

PIPE_KEYS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
PROMPT = "a red circle on a blue background"
COMMON = {"width": 32, "height": 32, "num_inference_steps": 4, "guidance_scale": 6.0, "guidance_rescale": 0.0,
          "output_type": "np"}
ATOL = 1e-5

SCHEDULERS = {
    "stock-ddim": lambda: DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
    "stock-euler": lambda: EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
    "ours-ddim": lambda: registry.build("ddim", SD15_SCHEDULER_CONFIG),
    "ours-dpmpp-2m": lambda: registry.build("dpmpp-2m", SD15_SCHEDULER_CONFIG),
    "ours-euler-a": lambda: registry.build("euler-a", SD15_SCHEDULER_CONFIG),  # draws step noise
}


@functools.lru_cache(maxsize=None)
def pipelines(scheduler: str):
    """Our pipeline and stock's three SD pipelines, all holding the same modules and scheduler object."""
    components = tiny_sd_components(scheduler=SCHEDULERS[scheduler]())
    stock = {cls.__name__: cls(**components, requires_safety_checker=False) for cls in (
        StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)}
    for pipe in stock.values():
        pipe.set_progress_bar_config(disable=True)
    ours = LatentTextToImagePipeline(**{k: components[k] for k in PIPE_KEYS})
    ours.set_progress_bar_config(disable=True)
    return ours, stock


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def init_image(seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8))


def right_half_mask():
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    return Image.fromarray(mask)


def assert_same(ours_images, stock_images):
    assert ours_images.shape == stock_images.shape
    np.testing.assert_allclose(ours_images, stock_images, atol=ATOL)


@pytest.fixture
def ddim():
    return pipelines("stock-ddim")


# ---------------------------------------------------------------- text to image


@pytest.mark.parametrize("scheduler", ["stock-ddim", "stock-euler", "ours-dpmpp-2m", "ours-euler-a"])
@pytest.mark.parametrize("form", ["single", "list"])
def test_generator_single_and_list_equal_stock(scheduler, form):
    ours, stock = pipelines(scheduler)
    make = (lambda: torch.Generator().manual_seed(21)) if form == "single" else (lambda: generators(21, 22))
    args = dict(COMMON, num_images_per_prompt=2, negative_prompt="a square")
    expected = stock["StableDiffusionPipeline"](PROMPT, generator=make(), **args).images
    got = ours(PROMPT, generator=make(), **args)
    assert_same(got.images, expected)
    assert got.seeds == [21, 21] if form == "single" else [21, 22]


def test_a_generator_takes_precedence_over_seed(ddim):
    ours, _ = ddim
    by_generator = ours(PROMPT, generator=generators(5), seed=99, **COMMON).images
    by_seed = ours(PROMPT, seed=5, **COMMON).images
    assert_same(by_generator, by_seed)


def test_latents_equal_stock(ddim):
    ours, stock = ddim
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    expected = stock["StableDiffusionPipeline"]([PROMPT, "a green square"], latents=noise.clone(), **COMMON).images
    got = ours([PROMPT, "a green square"], latents=noise.clone(), **COMMON)
    assert_same(got.images, expected)
    assert got.recipes[0]["noise"] == {"source": "latents"}


@pytest.mark.parametrize("scheduler", ["stock-ddim", "ours-ddim"])
@pytest.mark.parametrize("form", ["single", "list"])
def test_eta_one_with_ddim_equals_stock(scheduler, form):
    ours, stock = pipelines(scheduler)
    make = (lambda: torch.Generator().manual_seed(8)) if form == "single" else (lambda: generators(8, 9))
    expected = stock["StableDiffusionPipeline"](PROMPT, eta=1.0, generator=make(), num_images_per_prompt=2,
                                                **COMMON).images
    got = ours(PROMPT, eta=1.0, generator=make(), num_images_per_prompt=2, **COMMON)
    assert_same(got.images, expected)
    deterministic = ours(PROMPT, eta=0.0, generator=make(), num_images_per_prompt=2, **COMMON).images
    assert np.abs(deterministic - got.images).max() > 1e-3  # eta reached the sampler
    assert got.recipes[0]["eta"] == 1.0


def halve_latents_at_step_one(pipe, i, t, callback_kwargs):
    if i == 1:
        return {"latents": callback_kwargs["latents"] * 0.5}
    return callback_kwargs


def equal_to_stock_with(pipes, callback_on_step_end):
    """Our output with `callback_on_step_end` (asserted equal to stock's) and the steps our `callback` saw."""
    ours, stock = pipes
    expected = stock["StableDiffusionPipeline"](PROMPT, generator=generators(4), **COMMON,
                                                callback_on_step_end=callback_on_step_end).images
    steps = []
    got = ours(PROMPT, generator=generators(4), **COMMON, callback_on_step_end=callback_on_step_end,
               callback=lambda info: steps.append(info.step))
    assert_same(got.images, expected)
    return got, steps


def test_callback_on_step_end_that_changes_latents_equals_stock(ddim):
    got, steps = equal_to_stock_with(ddim, halve_latents_at_step_one)
    plain = ddim[0](PROMPT, generator=generators(4), **COMMON).images
    assert np.abs(plain - got.images).max() > 1e-3
    assert got.recipes[0]["altered_by"].endswith("halve_latents_at_step_one") and steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="callback_on_step_end .* changed"):
        recipe_to_options(got.recipes[0])


def test_callback_on_step_end_sees_what_it_asks_for_and_can_replace_embeddings(ddim):
    ours, stock = ddim
    calls = []

    def record(pipe, i, t, kwargs):
        calls.append((i, int(t), sorted(kwargs), pipe.num_timesteps))
        return {}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    out = ours(PROMPT, seed=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs, **COMMON)
    ours.scheduler.set_timesteps(4)
    assert calls == [(i, int(t), sorted(inputs), 4) for i, t in enumerate(ours.scheduler.timesteps)]
    assert "altered_by" not in out.recipes[0]  # it only looked
    # the returned prompt embeddings are used from the next step on; stock's prompt_embeds under CFG are the
    # concatenation [negative; positive], ours the positive ones alone
    other = encode_pair(ours.text_encoder, ours.tokenizer, ["a green square"], None, with_uncond=False).cond
    swapped = ours(PROMPT, seed=1, callback_on_step_end=lambda p, i, t, k: {"prompt_embeds": other},
                   callback_on_step_end_tensor_inputs=["prompt_embeds"], **COMMON).images
    expected = stock["StableDiffusionPipeline"](
        PROMPT, generator=generators(1), callback_on_step_end_tensor_inputs=["prompt_embeds"], **COMMON,
        callback_on_step_end=lambda p, i, t, k: {"prompt_embeds": torch.cat([k["prompt_embeds"][:1], other])}).images
    assert_same(swapped, expected)
    assert np.abs(swapped - out.images).max() > 1e-3


def interrupt_after_step_two(pipe, i, t, callback_kwargs):
    pipe._interrupt = i == 1
    return callback_kwargs


def test_interrupt_from_callback_on_step_end_equals_stock(ddim):
    got, steps = equal_to_stock_with(ddim, interrupt_after_step_two)
    assert steps == [1, 2] and got.unet_evaluations == 4
    assert got.recipes[0]["altered_by"].endswith("interrupt_after_step_two (interrupted after step 2)")
    assert ddim[0](PROMPT, seed=1, **COMMON).unet_evaluations == 8  # reset by the next call, as stock


@pytest.mark.parametrize("scheduler", ["stock-euler", "ours-dpmpp-2m"])
@pytest.mark.parametrize("grid", [{"timesteps": [999, 700, 400, 100]}, {"sigmas": [14.0, 5.0, 1.5, 0.4]}])
def test_custom_timesteps_and_sigmas_equal_stock(scheduler, grid):
    ours, stock = pipelines(scheduler)
    args = {k: v for k, v in COMMON.items() if k != "num_inference_steps"}
    expected = stock["StableDiffusionPipeline"](PROMPT, generator=generators(6), **grid, **args).images
    got = ours(PROMPT, generator=generators(6), **grid, **args)
    assert_same(got.images, expected)
    recipe = got.recipes[0]
    assert recipe["steps"] == len(ours.scheduler.timesteps) and {k: recipe[k] for k in grid} == grid
    again = ours(**GenerationOptions.from_recipe(recipe, output_type="np", progress_bar=False).kwargs())
    assert_same(again.images, got.images)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_guidance_scale_with_and_without_cfg_equals_stock(ddim, guidance_scale):
    ours, stock = ddim
    args = dict(COMMON, guidance_scale=guidance_scale, negative_prompt="a square")
    expected = stock["StableDiffusionPipeline"](PROMPT, generator=generators(2), **args).images
    got = ours(PROMPT, generator=generators(2), **args)
    assert_same(got.images, expected)
    assert got.unet_evaluations == (1 if guidance_scale == 1.0 else 2) * 4


def test_zero_terminal_snr_with_explicit_guidance_rescale_equals_stock():
    # our default rescale on a ZTSNR schedule is 0.7 (Lin et al. 2023), stock's is 0: both given explicitly
    config = dict(SD15_SCHEDULER_CONFIG, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction")
    SCHEDULERS["stock-ddim-ztsnr"] = lambda: DDIMScheduler.from_config(config)
    ours, stock = pipelines("stock-ddim-ztsnr")
    args = dict(COMMON, guidance_rescale=0.7)
    expected = stock["StableDiffusionPipeline"](PROMPT, generator=generators(3), **args).images
    assert_same(ours(PROMPT, generator=generators(3), **args).images, expected)
    default = ours(PROMPT, generator=generators(3), **{k: v for k, v in args.items() if k != "guidance_rescale"})
    assert default.recipes[0]["guidance"]["rescale"] == 0.7


def test_return_dict_false_gives_stock_tuple(ddim):
    ours, stock = ddim
    images, nsfw = ours(PROMPT, seed=1, return_dict=False, **COMMON)
    stock_images, stock_nsfw = stock["StableDiffusionPipeline"](PROMPT, generator=generators(1), return_dict=False,
                                                                **COMMON)
    assert nsfw is None and stock_nsfw is None
    assert_same(images, stock_images)


# ---------------------------------------------------------------- img2img and inpainting


@pytest.mark.parametrize("scheduler", ["stock-ddim", "stock-euler", "ours-dpmpp-2m", "ours-euler-a"])
@pytest.mark.parametrize("form", ["single", "list"])
def test_img2img_equals_stock(scheduler, form):
    # stock samples the VAE posterior with the generator(s) before drawing the noise; so do we
    ours, stock = pipelines(scheduler)
    make = (lambda: torch.Generator().manual_seed(12)) if form == "single" else (lambda: generators(12, 13))
    args = dict(COMMON, num_images_per_prompt=2, strength=0.6)
    del args["width"], args["height"]  # stock img2img takes the image's size
    expected = stock["StableDiffusionImg2ImgPipeline"](PROMPT, image=init_image(), generator=make(), **args).images
    assert_same(ours(PROMPT, image=init_image(), generator=make(), **args).images, expected)


@pytest.mark.parametrize("scheduler", ["stock-euler", "ours-dpmpp-2m"])
def test_img2img_with_custom_sigmas_equals_stock(scheduler):
    # strength takes its share of the custom grid's steps, as stock's get_timesteps
    ours, stock = pipelines(scheduler)
    args = {k: v for k, v in COMMON.items() if k not in ("num_inference_steps", "width", "height")}
    grid = dict(sigmas=[14.0, 8.0, 4.0, 2.0, 1.0, 0.3], strength=0.6)
    seen = {"stock": [], "ours": []}

    def record(name):
        return lambda pipe, i, t, kwargs: seen[name].append(float(t)) or kwargs

    expected = stock["StableDiffusionImg2ImgPipeline"](PROMPT, image=init_image(), generator=generators(9), **grid,
                                                       callback_on_step_end=record("stock"), **args).images
    got = ours(PROMPT, image=init_image(), generator=generators(9), **grid, callback_on_step_end=record("ours"), **args)
    assert_same(got.images, expected)
    assert seen["ours"] == seen["stock"] and len(seen["ours"]) in (2, 3)


def test_img2img_at_full_strength_keeps_stocks_trace_of_the_image(ddim):
    ours, stock = ddim
    args = dict(COMMON, strength=1.0)
    del args["width"], args["height"]
    expected = stock["StableDiffusionImg2ImgPipeline"](PROMPT, image=init_image(), generator=generators(3),
                                                       **args).images
    assert_same(ours(PROMPT, image=init_image(), generator=generators(3), **args).images, expected)


def test_seeded_img2img_equals_stock_with_per_image_generators(ddim):
    ours, stock = ddim
    args = dict(COMMON, num_images_per_prompt=2, strength=0.7)
    del args["width"], args["height"]
    expected = stock["StableDiffusionImg2ImgPipeline"](PROMPT, image=init_image(), generator=generators(40, 41),
                                                       **args).images
    got = ours(PROMPT, image=init_image(), seed=40, **args).images
    assert_same(got, expected)
    alone = ours(PROMPT, image=init_image(), seed=41, **{**args, "num_images_per_prompt": 1}).images
    assert_same(alone[0:1], got[1:2])  # image j still depends only on its seed


@pytest.mark.parametrize("scheduler", ["stock-ddim", "stock-euler", "ours-dpmpp-2m", "ours-euler-a", "eta=1"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_equals_stock(scheduler, strength):
    # stock's 4-channel inpainting blends the known latents, re-noised to the next timestep, after each step:
    # our InpaintBlend; one init image and one mask per output image, one generator each; stochastic samplers
    # too (the generators are drawn from in stock's order)
    ours, stock = pipelines("stock-ddim" if scheduler == "eta=1" else scheduler)
    images, masks = [init_image(0), init_image(1)], [right_half_mask()] * 2
    args = dict(COMMON, strength=strength, **({"eta": 1.0} if scheduler == "eta=1" else {}))
    expected = stock["StableDiffusionInpaintPipeline"]([PROMPT, "a green square"], image=images, mask_image=masks,
                                                       generator=generators(30, 31), **args).images
    got = ours([PROMPT, "a green square"], image=images, mask_image=masks, generator=generators(30, 31), **args)
    assert_same(got.images, expected)


@pytest.mark.parametrize("form", ["single", "list"])
def test_stochastic_inpainting_of_one_image_equals_stock(form):
    ours, stock = pipelines("ours-euler-a")
    make = (lambda: torch.Generator().manual_seed(14)) if form == "single" else (lambda: generators(14))
    args = dict(COMMON, image=init_image(2), mask_image=right_half_mask(), strength=0.8)
    expected = stock["StableDiffusionInpaintPipeline"](PROMPT, generator=make(), **args).images
    assert_same(ours(PROMPT, generator=make(), **args).images, expected)


def test_inpainting_with_latents_equals_stock(ddim):
    ours, stock = ddim
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    args = dict(image=init_image(), mask_image=right_half_mask(), **COMMON)
    expected = stock["StableDiffusionInpaintPipeline"](PROMPT, latents=noise.clone(), generator=generators(5),
                                                       **args).images
    assert_same(ours(PROMPT, latents=noise.clone(), generator=generators(5), **args).images, expected)


# ---------------------------------------------------------------- IP-Adapter


@pytest.fixture(scope="module")
def ip_adapted(tmp_path_factory):
    """Ours with a tiny IP-Adapter loaded by diffusers' `load_ip_adapter` (offline), and stock sharing its modules."""
    components = tiny_sd_components(scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG))
    folder = tmp_path_factory.mktemp("ip-adapter")
    weight_name = tiny_ip_adapter(components["unet"], folder)
    ours = LatentTextToImagePipeline(**{k: components[k] for k in PIPE_KEYS})
    ours.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, local_files_only=True)
    stock = StableDiffusionPipeline(**{**components, "image_encoder": ours.image_encoder,
                                       "feature_extractor": ours.feature_extractor}, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    return ours, stock


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_ip_adapter_image_equals_stock(ip_adapted, guidance_scale):
    ours, stock = ip_adapted
    args = dict(COMMON, guidance_scale=guidance_scale, num_images_per_prompt=2, progress_bar=False)
    del args["progress_bar"]
    expected = stock(PROMPT, ip_adapter_image=init_image(3), generator=generators(1, 2), **args).images
    got = ours(PROMPT, ip_adapter_image=init_image(3), generator=generators(1, 2), progress_bar=False, **args)
    assert_same(got.images, expected)
    record = got.recipes[0]["ip_adapter"]  # what the image was made with, without the image itself
    assert record["scale"] == [1.0] and len(record["image_sha256"]) == 64
    with pytest.raises(ValueError, match=f"IP-Adapter \\(image sha256 {record['image_sha256'][:12]}, scale"):
        recipe_to_options(got.recipes[0])
    other = ours(PROMPT, ip_adapter_image=init_image(4), generator=generators(1, 2), progress_bar=False, **args)
    assert np.abs(other.images - got.images).max() > 1e-3  # the adapter's image reaches the UNet
    assert other.recipes[0]["ip_adapter"]["image_sha256"] != record["image_sha256"]
    ours.set_ip_adapter_scale(0.5)
    try:
        halved = ours(PROMPT, ip_adapter_image=init_image(3), generator=generators(1, 2), progress_bar=False, **args)
    finally:
        ours.set_ip_adapter_scale(1.0)
    assert halved.recipes[0]["ip_adapter"] == {**record, "scale": [0.5]}
    with pytest.raises(InvalidOptions, match="An IP-Adapter is loaded: give ip_adapter_image"):
        ours(PROMPT, **args)


def test_ip_adapter_image_embeds_equal_stock(ip_adapted):
    ours, stock = ip_adapted
    embeds = stock.prepare_ip_adapter_image_embeds(init_image(4), None, "cpu", 1, True)  # [negative; positive]
    expected = stock(PROMPT, ip_adapter_image_embeds=embeds, generator=generators(5), **COMMON).images
    got = ours(PROMPT, ip_adapter_image_embeds=embeds, generator=generators(5), progress_bar=False, **COMMON).images
    assert_same(got, expected)
    by_image = ours(PROMPT, ip_adapter_image=init_image(4), generator=generators(5), progress_bar=False,
                    **COMMON).images
    assert_same(got, by_image)


# ---------------------------------------------------------------- recipes


def test_recipes_of_generator_calls(ddim):
    ours, _ = ddim
    fresh = ours(PROMPT, generator=generators(70, 71), num_images_per_prompt=2, **COMMON)
    assert [r["seed"] for r in fresh.recipes] == [70, 71] and "noise" not in fresh.recipes[1]
    again = ours(**GenerationOptions.from_recipe(fresh.recipes[1], output_type="np", progress_bar=False).kwargs())
    assert_same(again.images, fresh.images[1:2])

    shared = ours(PROMPT, generator=torch.Generator().manual_seed(72), num_images_per_prompt=2, **COMMON).recipes
    assert shared[1]["seed"] == 72 and shared[1]["noise"] == {"source": "shared_generator", "images": 2, "index": 1}
    with pytest.raises(ValueError, match="one torch.Generator drew the noise of all 2 images"):
        recipe_to_options(shared[1])

    used = torch.Generator().manual_seed(73)
    torch.randn(3, generator=used)
    recipe = ours(PROMPT, generator=used, **COMMON).recipes[0]
    assert recipe["seed"] is None and recipe["noise"] == {"source": "used_generator"}
    with pytest.raises(ValueError, match="had been used before the call"):
        recipe_to_options(recipe)


# ---------------------------------------------------------------- what cannot apply is refused


@pytest.mark.parametrize("scheduler, options, message", [
    ("stock-euler", {"eta": 0.5}, "EulerDiscreteScheduler.step takes no eta"),
    ("stock-ddim", {"timesteps": [999, 500], "num_inference_steps": None},
     "Custom timesteps cannot apply: DDIMScheduler.set_timesteps"),
    ("stock-ddim", {"sigmas": [10.0, 1.0], "num_inference_steps": None}, "Custom sigmas cannot apply"),
    ("stock-ddim", {"timesteps": [999, 500], "sigmas": [1.0, 0.5]}, "either timesteps or sigmas"),
    ("stock-euler", {"sigmas": [9.0, 3.0, 1.0], "num_inference_steps": 3}, "custom sigmas make 2 steps with Euler"),
    ("stock-ddim", {"timesteps": "fast"}, "timesteps must be a non-empty list"),
    ("stock-ddim", {"eta": -1.0}, "eta .* must be a finite number >= 0"),
    ("stock-ddim", {"generator": generators(1, 2, 3)}, "3 generators for 2 images"),
    ("stock-ddim", {"generator": 7}, "generator must be a torch.Generator"),
    ("stock-ddim", {"latents": torch.zeros(2, 4, 8, 8)}, r"latents have shape \(2, 4, 8, 8\); this call needs "
                                                         r"\(2, 4, 16, 16\)"),
    ("stock-ddim", {"latents": torch.zeros(2, 4, 16, 16), "image": init_image()}, "cannot be combined with an init"),
    ("stock-ddim", {"ip_adapter_image": init_image()}, "need an IP-Adapter, and none is loaded"),
    ("stock-ddim", {"callback_on_step_end": SDCFGCutoffCallback(cutoff_step_ratio=0.5)}, "use guidance_interval"),
    ("stock-ddim", {"callback_on_step_end": halve_latents_at_step_one,
                    "callback_on_step_end_tensor_inputs": ["mask"]}, "inputs mask do not exist in this pipeline"),
    ("stock-ddim", {"callback_on_step_end": 3}, "callback_on_step_end must be callable"),
    ("stock-ddim", {"return_dict": "no"}, "return_dict must be True or False"),
])
def test_arguments_that_cannot_apply_are_refused(scheduler, options, message):
    ours, _ = pipelines(scheduler)
    with pytest.raises(InvalidOptions, match=message):
        ours(PROMPT, num_images_per_prompt=2, **{**COMMON, **options})
