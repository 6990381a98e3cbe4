"""Hires fix: the upscaled size, the two passes it is made of, its recipe round trip and A1111 infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from ldm_pipeline import GenerationCancelled, GenerationOptions, InvalidOptions, LatentTextToImagePipeline, metadata
from ldm_pipeline.hires import HiresFix, schedule_steps, upscaler_name
from ldm_pipeline.scheduler_swap import scheduler_from_recipe, swap_scheduler
from training.tiny_models import tiny_sd_components

BASE = dict(prompt="a red circle", negative_prompt="blurry", width=32, height=32, num_inference_steps=3, seed=21,
            progress_bar=False)


def make_pipe() -> LatentTextToImagePipeline:
    parts = tiny_sd_components()
    return LatentTextToImagePipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("upscaler, scale, size", [("Latent", 2, (64, 64)), ("latent-nearest", 1.5, (48, 48)),
                                                   ("Lanczos", 2, (64, 64))])
def test_hires_makes_the_upscaled_size(pipe, upscaler, scale, size):
    out = pipe(**BASE, hires=HiresFix(scale=scale, steps=2, strength=0.5, upscaler=upscaler))
    assert out.images[0].size == size
    assert out.recipes[0]["width"] == 32 and out.recipes[0]["hires"]["upscaler"] == upscaler_name(upscaler)


def test_latent_hires_is_a_latent_pass_interpolated_then_img2img(pipe):
    steps = []
    out = pipe(**BASE, hires=HiresFix(scale=2, steps=2, strength=0.3, upscaler="Latent (nearest)"),
               callback=lambda info: steps.append(info.num_steps))
    assert steps == [3, 3, 3, 2, 2]  # 3 base steps, then the last 2 of a 7-step schedule (int(7 * 0.3) = 2)
    base = pipe(**BASE, output_type="latent").images
    init = F.interpolate(base, size=(64 // pipe.vae_scale_factor,) * 2, mode="nearest")
    by_hand = pipe(**{**BASE, "width": 64, "height": 64, "num_inference_steps": 7}, image=init, strength=0.3)
    assert np.array_equal(array(out.images[0]), array(by_hand.images[0]))


def test_pixel_hires_decodes_resizes_with_lanczos_and_encodes_again(pipe):
    out = pipe(**BASE, hires=HiresFix(scale=2, steps=0, strength=0.5, upscaler="Lanczos"))
    base = pipe(**BASE).images[0].resize((64, 64), resample=Image.Resampling.LANCZOS)
    by_hand = pipe(**{**BASE, "width": 64, "height": 64, "num_inference_steps": 6}, image=base, strength=0.5)
    assert np.array_equal(array(out.images[0]), array(by_hand.images[0]))  # steps 0 = the base 3 steps run


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_image_regenerates_from_its_png_recipe(tmp_path, upscaler):
    first = make_pipe()
    swap_scheduler(first, "dpmpp-2m", sigma_schedule="karras")
    out = first(**BASE, hires=HiresFix(scale=2, steps=2, strength=0.6, upscaler=upscaler))
    path = metadata.write_png(tmp_path / "hires.png", out.images[0], out.recipes[0])
    recipe = metadata.read_png(path).recipe
    second = make_pipe()
    second.scheduler = scheduler_from_recipe(recipe)
    again = second(**GenerationOptions.from_recipe(recipe, progress_bar=False).kwargs())
    assert again.images[0].size == (64, 64)
    assert np.array_equal(array(again.images[0]), array(Image.open(path)))


def test_infotext_is_a1111s_and_parses_back():
    recipe = {"prompt": "a cat", "seed": 3, "steps": 20, "width": 512, "height": 512, "strength": None,
              "hires": {"scale": 2.0, "steps": 10, "strength": 0.5, "upscaler": "Latent"}}
    text = metadata.format_parameters(recipe)
    assert "Denoising strength: 0.5" in text and "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent" in text
    assert metadata.recipe_to_options({**recipe, "guidance": {}})["hires"] == recipe["hires"]
    a1111 = ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
             "Denoising strength: 0.45, Hires upscale: 1.5, Hires upscaler: Latent (nearest-exact)")
    options = metadata.parameters_to_options(metadata.parse_parameters(a1111))
    assert options["hires"] == {"scale": 1.5, "steps": 0, "strength": 0.45, "upscaler": "Latent (nearest-exact)"}
    assert "strength" not in options  # the hires pass' strength, not an img2img one
    assert GenerationOptions(prompt="a cat", hires=options["hires"]).check() is not None


@pytest.mark.parametrize("hires, message", [
    (HiresFix(scale=1.0), "Hires upscale must be a number above 1"),
    (HiresFix(scale=2, steps=-1), "Hires steps must be a whole number >= 0"),
    (HiresFix(scale=2, strength=0.0), "Hires denoising strength must be above 0"),
    (HiresFix(scale=2, upscaler="R-ESRGAN 4x+"), "Unknown hires upscaler 'R-ESRGAN 4x\\+': choose one of Latent"),
    ({"scale": 2, "denoise": 0.5}, "Unknown hires fix key\\(s\\) denoise"),
    ("2x", "hires must be a HiresFix, a dict"),
])
def test_bad_hires_settings_are_refused_naming_the_fix(pipe, hires, message):
    with pytest.raises(InvalidOptions, match=message):
        pipe(**BASE, hires=hires)


def test_hires_refuses_init_images_and_sizes_beyond_the_limits(pipe):
    with pytest.raises(InvalidOptions, match="Hires fix is for text to image"):
        pipe(**BASE, image=Image.new("RGB", (32, 32)), hires=HiresFix())
    with pytest.raises(InvalidOptions, match="exceeds this model's limits"):
        pipe(**{**BASE, "num_inference_steps": 600}, hires=HiresFix(scale=2, strength=0.5))


def test_cancelling_in_the_hires_pass_stops_it(pipe):
    def stop_in_second_pass(info):
        return info.num_steps == 2  # the hires pass (the base pass runs 3 steps)

    with pytest.raises(GenerationCancelled):
        pipe(**BASE, hires=HiresFix(scale=2, steps=2, strength=0.5), callback=stop_in_second_pass)


@pytest.mark.parametrize("run", [1, 2, 7, 10, 33])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0])
def test_schedule_steps_runs_exactly_the_hires_steps(run, strength):
    total = schedule_steps(run, strength)
    assert int(total * strength) == run and int((total - 1) * strength) < run
