"""LatentTextToImagePipeline against stock diffusers and its own contracts (tiny models, 32x32)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from ldm_pipeline import GenerationCancelled, LatentTextToImagePipeline
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components

PIPE_KEYS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
SMALL = {"width": 32, "height": 32, "num_inference_steps": 3, "progress_bar": False}


def make_pair(scheduler=None):
    components = tiny_sd_components(scheduler=scheduler)
    stock = StableDiffusionPipeline(**components, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    ours = LatentTextToImagePipeline(**{k: components[k] for k in PIPE_KEYS})
    return stock, ours


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
def test_equals_stock_stable_diffusion(scheduler_class):
    stock, ours = make_pair(scheduler_class.from_config(SD15_SCHEDULER_CONFIG))
    prompts = ["a red circle on a blue background", "a small green square"]
    generators = [torch.Generator().manual_seed(s) for s in (11, 12, 13, 14)]
    expected = stock(prompts, negative_prompt=["blurry", "dark"], num_inference_steps=3, guidance_scale=6.0,
                     width=32, height=32, generator=generators, num_images_per_prompt=2, output_type="np").images
    got = ours(prompts, negative_prompt=["blurry", "dark"], guidance_scale=6.0, seed=11, num_images_per_prompt=2,
               output_type="np", **SMALL)
    assert got.seeds == [11, 12, 13, 14]
    assert got.images.shape == expected.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(got.images, expected, atol=1e-5)


def test_clip_skip_equals_stock(pair):
    # stock `clip_skip` reads `text_encoder.text_model`, which transformers 5 removed, so the
    # penultimate-layer embeddings are computed here as diffusers documents and passed in
    stock, ours = pair
    ids = ours.tokenizer(["a red circle", ""], padding="max_length", return_tensors="pt").input_ids
    hidden = ours.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    cond, uncond = ours.text_encoder.final_layer_norm(hidden).detach().chunk(2)
    expected = stock(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, width=32, height=32,
                     generator=[torch.Generator().manual_seed(3)], output_type="np").images
    got = ours("a red circle", clip_skip=1, seed=3, output_type="np", **SMALL).images
    plain = ours("a red circle", seed=3, output_type="np", **SMALL).images
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - plain).max() > 1e-4


def test_image_depends_only_on_its_seed(pair):
    _, ours = pair
    batch = ours("a red circle", seed=[5, 6, 7, 8], num_images_per_prompt=4, output_type="np", **SMALL).images
    for j, seed in enumerate([5, 6, 7, 8]):
        single = ours("a red circle", seed=seed, output_type="np", **SMALL).images[0]
        np.testing.assert_allclose(batch[j], single, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_output_types_and_recipes(pair):
    _, ours = pair
    latents = ours("a circle", seed=1, output_type="latent", num_images_per_prompt=2, **SMALL)
    assert latents.images.shape == (2, 4, 16, 16)
    pil = ours("a circle", seed=1, output_type="pil", **SMALL)
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (32, 32)
    recipe = pil.recipes[0]
    assert recipe["seed"] == 1 and recipe["steps"] == 3 and recipe["scheduler"]["class"] == "DDIMScheduler"
    assert recipe["guidance"]["scale"] == 7.5 and recipe["width"] == 32


def test_callback_sees_every_step_and_can_cancel(pair):
    _, ours = pair
    seen = []
    ours("a circle", seed=1, callback=lambda info: seen.append((info.step, info.num_steps)), **SMALL)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    calls = []

    def stop_at_two(info):
        calls.append(info.step)
        return info.step == 2

    with pytest.raises(GenerationCancelled, match="after step 2 of 3"):
        ours("a circle", seed=1, callback=stop_at_two, **SMALL)
    assert calls == [1, 2]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"width": 31}, "Width must be a multiple of 8"),
        ({"bogus": 1}, "Unknown pipeline option"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"seed": [1, 2]}, "2 seeds for 1 images"),
        ({"mask_image": Image.new("L", (32, 32))}, "needs `image`"),
        ({"guidance_schedule": "wobbly"}, "Unknown guidance schedule"),
        ({"output_type": "jpeg"}, "output_type"),
    ],
)
def test_bad_options_name_the_problem(pair, options, message):
    _, ours = pair
    with pytest.raises((ValueError, TypeError), match=message):
        ours("a circle", **{**SMALL, **options})


def test_img2img_runs_strength_times_steps(pair):
    _, ours = pair
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    steps = []
    out = ours("a circle", image=init, strength=0.5, seed=2, callback=lambda i: steps.append(i.timestep),
               output_type="np", **{**SMALL, "num_inference_steps": 4})
    assert len(steps) == 2 and out.unet_evaluations == 4
    assert out.recipes[0]["strength"] == 0.5
    ours.scheduler.set_timesteps(4)
    assert steps == [float(t) for t in ours.scheduler.timesteps[2:]]


def test_img2img_low_strength_stays_near_the_init_image(pair):
    _, ours = pair
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    common = dict(image=init, seed=2, output_type="latent", **{**SMALL, "num_inference_steps": 10})
    known = ours._encode_image(init, 1, 32, 32)
    near = ours("a circle", strength=0.1, **common).images
    far = ours("a circle", strength=1.0, **common).images
    assert (near - known).abs().mean() < 0.5 * (far - known).abs().mean()


def test_inpainting_keeps_the_unmasked_region(pair):
    _, ours = pair
    init = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255  # repaint the right half
    out = ours("a circle", image=init, mask_image=Image.fromarray(mask), seed=4, output_type="latent", **SMALL)
    known = ours._encode_image(init, 1, 32, 32, [torch.Generator().manual_seed(4)])  # the seed's VAE sample, as stock
    torch.testing.assert_close(out.images[..., :8], known[..., :8])  # latent width 16: left half kept exactly
    assert (out.images[..., 8:] - known[..., 8:]).abs().mean() > 0.1
    assert out.recipes[0]["inpainting"] is True and out.recipes[0]["strength"] == 1.0


def test_precomputed_embeddings_equal_text(pair):
    _, ours = pair
    from ldm_pipeline.prompts import encode_pair

    embeds = encode_pair(ours.text_encoder, ours.tokenizer, ["a red circle"], ["blurry"], with_uncond=True)
    by_text = ours("a red circle", negative_prompt="blurry", seed=9, output_type="np", **SMALL).images
    by_embeds = ours(prompt_embeds=embeds.cond, negative_prompt_embeds=embeds.uncond, seed=9, output_type="np",
                     **SMALL).images
    np.testing.assert_allclose(by_embeds, by_text, atol=1e-6)
