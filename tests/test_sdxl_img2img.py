"""SDXL img2img, inpainting, precomputed embeddings and the base + refiner hand-off, against stock diffusers.

The init image is given to both as latents (a [B, 4, h, w] tensor, which both use as they are, as a
refiner takes a base's output), and as a PIL image (its VAE posterior sampled from the generator,
as stock does).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from ldm_pipeline.options import InvalidOptions
from ldm_pipeline.sdxl import LatentSDXLPipeline
from training.tiny_models import tiny_sdxl_components

SIZE = 32
CONDITIONING = dict(original_size=(48, 40), crops_coords_top_left=(4, 8), target_size=(32, 32),
                    negative_original_size=(24, 24), negative_target_size=(40, 32))


def _scheduler():
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                  timestep_spacing="leading")


def tiny_refiner_components(seed: int = 0) -> dict:
    """A refiner as diffusers' SDXL img2img tests build one (skip_first_text_encoder): encoder 2 only
    (cross-attention 32) and the aesthetic score in the time ids (5 * 8 + 32 = 72 added features)."""
    base = tiny_sdxl_components(seed, scheduler=_scheduler())
    torch.manual_seed(seed + 7)
    unet = UNet2DConditionModel.from_config(base["unet"].config, cross_attention_dim=32,
                                            projection_class_embeddings_input_dim=72).eval()
    return {**base, "unet": unet, "text_encoder": None, "tokenizer": None, "requires_aesthetics_score": True,
            "force_zeros_for_empty_prompt": False}


@pytest.fixture(scope="module")
def components():
    return tiny_sdxl_components(scheduler=_scheduler())


@pytest.fixture(scope="module")
def ours(components):
    return LatentSDXLPipeline(**components)


@pytest.fixture(scope="module")
def init_latents(ours):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    with torch.no_grad():
        return image, ours._encode_image(image, 1, SIZE, SIZE)  # the posterior mean


def _mask():
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half
    return mask


def _gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def _run_ours(pipe, seed, **kwargs):
    return pipe(seed=seed, output_type="np", progress_bar=False, **kwargs).images


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_img2img_matches_stock(components, ours, init_latents, guidance):
    stock = StableDiffusionXLImg2ImgPipeline(**components)
    _, latents = init_latents
    kwargs = dict(prompt="red circle", prompt_2="blue square", image=latents, strength=0.6, num_inference_steps=5,
                  guidance_scale=guidance, **CONDITIONING)
    expected = stock(generator=_gen(4), output_type="np", **kwargs).images
    got = _run_ours(ours, 4, **kwargs)
    assert got.shape == expected.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("guidance, strength", [(1.0, 1.0), (5.0, 0.7)])
def test_inpainting_matches_stock(components, ours, init_latents, guidance, strength):
    stock = StableDiffusionXLInpaintPipeline(**components)
    _, latents = init_latents
    kwargs = dict(prompt="red circle", negative_prompt="green", image=latents, mask_image=_mask(), strength=strength,
                  num_inference_steps=4, guidance_scale=guidance, height=SIZE, width=SIZE, **CONDITIONING)
    expected = stock(generator=_gen(2), output_type="np", **kwargs).images
    np.testing.assert_allclose(_run_ours(ours, 2, **kwargs), expected, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_pil_image_matches_stock(components, ours, init_latents, masked):
    """An image (not latents): its VAE posterior sampled from the seed's generator before the noise, as stock."""
    image, _ = init_latents
    stock = (StableDiffusionXLInpaintPipeline if masked else StableDiffusionXLImg2ImgPipeline)(**components)
    kwargs = dict(prompt="red circle", image=image, strength=0.5, num_inference_steps=4, guidance_scale=3.0,
                  height=SIZE, width=SIZE, **({"mask_image": _mask()} if masked else {}))
    expected = stock(generator=_gen(1), output_type="np", **kwargs).images
    np.testing.assert_allclose(_run_ours(ours, 1, **kwargs), expected, atol=1e-5)


def test_prompt_embeds_with_pooled_match_stock(components, ours):
    stock = StableDiffusionXLPipeline(**components)
    cond, uncond, pooled, uncond_pooled = stock.encode_prompt("red circle", prompt_2="blue", negative_prompt="green")
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=uncond_pooled, num_inference_steps=3, height=SIZE, width=SIZE,
                  guidance_scale=4.0)
    expected = stock(generator=_gen(6), output_type="np", **kwargs).images
    np.testing.assert_allclose(_run_ours(ours, 6, **kwargs), expected, atol=1e-5)
    by_text = _run_ours(ours, 6, prompt="red circle", prompt_2="blue", negative_prompt="green",
                        **{k: kwargs[k] for k in ("num_inference_steps", "height", "width", "guidance_scale")})
    np.testing.assert_allclose(by_text, expected, atol=1e-5)
    # no negative embeddings: zeros (force_zeros_for_empty_prompt), as stock
    kwargs.pop("negative_prompt_embeds"), kwargs.pop("negative_pooled_prompt_embeds")
    np.testing.assert_allclose(_run_ours(ours, 6, **kwargs), stock(generator=_gen(6), output_type="np",
                                                                    **kwargs).images, atol=1e-5)


def test_prompt_embeds_without_pooled_are_refused(ours):
    with pytest.raises(InvalidOptions, match="prompt_embeds for an SDXL model needs pooled_prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 77, 64), num_inference_steps=1)


def test_hand_off_options_are_checked(ours):
    with pytest.raises(InvalidOptions, match="denoising_start needs `image`"):
        ours("red circle", denoising_start=0.8, num_inference_steps=2)
    with pytest.raises(InvalidOptions, match="denoising_end must be a fraction strictly between 0 and 1"):
        ours("red circle", denoising_end=1.5, num_inference_steps=2)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_base_and_refiner_hand_off_matches_stock(components, guidance):
    refiner_parts = tiny_refiner_components()
    stock_base, stock_refiner = StableDiffusionXLPipeline(**components), StableDiffusionXLImg2ImgPipeline(**refiner_parts)
    base, refiner = LatentSDXLPipeline(**components), LatentSDXLPipeline(**refiner_parts)
    common = dict(prompt="red circle", num_inference_steps=6, guidance_scale=guidance)
    size = dict(height=SIZE, width=SIZE)
    latents = stock_base(generator=_gen(8), denoising_end=0.7, output_type="latent", **size, **common).images
    expected = stock_refiner(generator=_gen(9), image=latents, denoising_start=0.7, output_type="np",
                             aesthetic_score=7.0, **common).images
    ours_latents = base(seed=8, denoising_end=0.7, output_type="latent", progress_bar=False, **size, **common).images
    torch.testing.assert_close(ours_latents, latents, atol=1e-5, rtol=0)
    got = _run_ours(refiner, 9, image=ours_latents, denoising_start=0.7, aesthetic_score=7.0, **common)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the refiner runs only the steps below the switch: 6 steps, 0.7 -> the last 2
    steps = []
    refiner(image=ours_latents, denoising_start=0.7, callback=steps.append, seed=9, progress_bar=False, **common)
    assert [s.step for s in steps] == [1, 2]


def test_refiner_folder_round_trips_through_stock(tmp_path):
    from ldm_pipeline.loading import load_pipeline

    StableDiffusionXLImg2ImgPipeline(**tiny_refiner_components()).save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert isinstance(pipe, LatentSDXLPipeline) and pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    pipe.save_pretrained(tmp_path / "again")
    stock = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "again")
    latents = torch.randn(1, 4, 4, 4, generator=_gen(0))
    kwargs = dict(prompt="red circle", image=latents, strength=0.5, num_inference_steps=4, guidance_scale=3.0)
    np.testing.assert_allclose(_run_ours(pipe, 3, **kwargs), stock(generator=_gen(3), output_type="np", **kwargs).images,
                               atol=1e-5)


def test_refiner_clip_skip_is_checked_against_its_encoder():
    refiner = LatentSDXLPipeline(**tiny_refiner_components())
    assert refiner.limits().clip_layers == refiner.text_encoder_2.config.num_hidden_layers
    with pytest.raises(InvalidOptions, match="Clip skip"):
        refiner("red circle", image=torch.zeros(1, 4, 4, 4), clip_skip=9, num_inference_steps=2)


def test_cli_refiner_hands_off_and_writes_a1111_refiner_fields(components, tmp_path):
    from ldm_pipeline.generate import main
    from ldm_pipeline.loading import load_pipeline
    from ldm_pipeline.metadata import read_png
    from ldm_pipeline.options import GenerationOptions
    from ldm_pipeline.sdxl import Refiner

    base_folder, refiner_folder = tmp_path / "base", tmp_path / "tiny-refiner"
    StableDiffusionXLPipeline(**components).save_pretrained(base_folder)
    StableDiffusionXLImg2ImgPipeline(**tiny_refiner_components()).save_pretrained(refiner_folder)
    out = tmp_path / "out"
    args = ["red circle", "--model", str(base_folder), "--refiner", str(refiner_folder), "--refiner-switch-at", "0.7",
            "--steps", "6", "--width", "32", "--height", "32", "--seed", "4", "--guidance", "3", "--out", str(out)]
    assert main(args) == 0
    found = read_png(out / "00000_000.png")
    refiner = load_pipeline(refiner_folder)
    assert found.recipe["refiner"] == {"name": "tiny-refiner", "hash": refiner.model_hash, "switch_at": 0.7}
    assert "sdxl" not in found.recipe  # the hand-off's denoising_end is the refiner's record, not an option
    assert found.parameters["Refiner"] == f"tiny-refiner [{refiner.model_hash[:10]}]"
    assert found.parameters["Refiner switch at"] == "0.7"
    # the same as the hand-off in Python, and as stock's: base to 0.7 as latents, the refiner from 0.7
    base = load_pipeline(base_folder)
    options = GenerationOptions(prompt="red circle", num_inference_steps=6, width=32, height=32, seed=4,
                                guidance_scale=3.0, output_type="np", progress_bar=False)
    expected = Refiner(refiner, 0.7)(base, options).images[0]
    got = np.asarray(Image.open(out / "00000_000.png"), dtype=np.float32) / 255
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
    stock_latents = StableDiffusionXLPipeline(**components)(
        "red circle", num_inference_steps=6, width=32, height=32, guidance_scale=3.0, generator=_gen(4),
        denoising_end=0.7, output_type="latent").images
    stock = StableDiffusionXLImg2ImgPipeline(**tiny_refiner_components())(
        "red circle", image=stock_latents, denoising_start=0.7, num_inference_steps=6, guidance_scale=3.0,
        generator=_gen(4), output_type="np").images[0]
    np.testing.assert_allclose(expected, stock, atol=1e-5)
    with pytest.raises(ValueError, match="The refiner must be an SDXL model"):
        Refiner(load_pipeline(None), 0.8)  # the embedded SD model
