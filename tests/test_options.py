"""The settings record: defaults from the model, recipe round trip, seeds, init image modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline import load_pipeline, metadata
from ldm_pipeline.options import GenerationOptions, InvalidOptions, as_rgb, image_seeds, line_seed
from ldm_pipeline.scheduler_swap import scheduler_from_recipe, swap_scheduler


@pytest.fixture(scope="module")
def default_pipe():
    return load_pipeline(device="cpu")


def test_no_options_means_the_models_recommended_settings(default_pipe):
    out = default_pipe("a red circle on a blue background", progress_bar=False)
    recipe = out.recipes[0]
    assert (recipe["steps"], recipe["guidance"]["scale"]) == (10, 3.0) == (
        default_pipe.recommended["num_inference_steps"], default_pipe.recommended["guidance_scale"])
    explicit = GenerationOptions(prompt="p", num_inference_steps=4).with_defaults(default_pipe.recommended)
    assert (explicit.num_inference_steps, explicit.guidance_scale) == (4, 3.0)
    assert GenerationOptions(prompt="p").with_defaults({}).num_inference_steps == 30  # SD's, when nothing is known


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "DDIMScheduler"])
def test_recipe_alone_regenerates_identical_png_bytes(default_pipe, sampler, tmp_path):
    swap_scheduler(default_pipe, sampler)
    out = default_pipe("a green square", negative_prompt="a circle", num_inference_steps=4, guidance_scale=4.0,
                       guidance_schedule="cosine", guidance_interval=(0.2, 9.0), guidance_rescale=0.3, width=32,
                       height=48, seed=123, progress_bar=False)
    first = metadata.write_png(tmp_path / "first.png", out.images[0], out.recipes[0])
    recipe = metadata.read_png(first).recipe
    swap_scheduler(default_pipe, "euler")  # the recipe alone must bring its sampler back
    default_pipe.scheduler = scheduler_from_recipe(recipe)
    options = GenerationOptions.from_recipe(recipe, progress_bar=False)
    again = default_pipe(**options.kwargs())
    second = metadata.write_png(tmp_path / "second.png", again.images[0], again.recipes[0])
    assert first.read_bytes() == second.read_bytes()


def test_seed_rule():
    assert image_seeds(5, 3) == [5, 6, 7]
    assert image_seeds([9, 1], 2) == [9, 1]
    assert line_seed(100, 2) == 20_100
    with pytest.raises(InvalidOptions, match="2 seeds for 3 images"):
        image_seeds([1, 2], 3)


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "I;16", "I", "F", "CMYK"])
def test_init_images_of_any_mode_become_rgb(mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    grey = np.asarray(rgb.convert("L"))
    if mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 257, "I;16")
    elif mode in ("I", "F"):
        image = Image.fromarray(grey.astype(np.int32 if mode == "I" else np.float32) / (1 if mode == "I" else 255.0))
        image = image.convert(mode) if mode == "I" else image
    else:
        image = rgb.convert(mode)
    converted = as_rgb(image)
    assert converted.mode == "RGB" and converted.size == (8, 8)
    if mode in ("L", "I;16", "I", "F"):  # the same grey levels, in 8 bits
        assert np.abs(np.asarray(converted)[..., 0].astype(int) - grey).max() <= 1


def test_16_bit_and_rgba_init_images_run_img2img(default_pipe):
    swap_scheduler(default_pipe, "ddim")
    rgb = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    common = dict(num_inference_steps=2, strength=0.5, seed=3, output_type="np", progress_bar=False)
    reference = default_pipe("a circle", image=rgb, **common).images
    with_alpha = default_pipe("a circle", image=rgb.convert("RGBA"), **common).images
    np.testing.assert_array_equal(with_alpha, reference)
    grey16 = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257, "I;16")
    assert default_pipe("a circle", image=grey16, **common).images.shape == reference.shape


@pytest.mark.parametrize("spacing, offset, most", [("leading", 1, 999), ("leading", 0, 1000), ("trailing", 1, 1000)])
def test_the_step_limit_leaves_room_for_steps_offset_under_leading_spacing(tiny_model_dir, spacing, offset, most):
    """SD 1.x's own config (leading, steps_offset 1) at 1000 steps would ask for timestep 1000 (stock DDIM
    indexes past its table); the limit says 999 up front, and 999 steps run."""
    pipe = load_pipeline(tiny_model_dir)
    swap_scheduler(pipe, "ddim", timestep_spacing=spacing, steps_offset=offset)
    assert pipe.limits().max_steps == most
    with pytest.raises(InvalidOptions, match=rf"must be a whole number from 1 to {most} "):
        pipe("a red circle", num_inference_steps=most + 1, output_type="latent", progress_bar=False)
    pipe.scheduler.set_timesteps(most)  # the most steps the check allows are a valid grid
    assert int(pipe.scheduler.timesteps.max()) <= 999
