"""PNG metadata: A1111 `parameters` text (ours and A1111's own), JSON recipe, atomic writes, regeneration."""

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_pipeline import LatentTextToImagePipeline, metadata, swap_scheduler
from training.tiny_models import tiny_sd_components

A1111_TEXT = (
    "masterpiece, best quality, a cat, (red hair:1.2)\n"
    "on two lines\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, "
    'Lora hashes: "add_detail: 7c6bad76eb54, other: 0123456789ab", Version: v1.6.0'
)


@pytest.fixture(scope="module")
def pipe():
    c = tiny_sd_components()
    pipe = LatentTextToImagePipeline(**{k: c[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.model_id, pipe.model_hash = "/models/tiny", "ab" * 32
    return pipe


def test_parse_a1111_written_text():
    p = metadata.parse_parameters(A1111_TEXT)
    assert p["Prompt"] == "masterpiece, best quality, a cat, (red hair:1.2)\non two lines"
    assert p["Negative prompt"] == "lowres, bad anatomy"
    assert p["Steps"] == "20" and p["Sampler"] == "DPM++ 2M Karras" and p["Seed"] == "1234567890"
    assert p["Size-1"] == "512" and p["Size-2"] == "768"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54, other: 0123456789ab"
    assert p["Version"] == "v1.6.0"
    options = metadata.parameters_to_options(p)
    assert options == {
        "prompt": p["Prompt"], "negative_prompt": "lowres, bad anatomy", "num_inference_steps": 20,
        "guidance_scale": 7.0, "seed": 1234567890, "width": 512, "height": 768, "strength": 0.5, "clip_skip": 1,
        "scheduler": "dpmpp-2m", "scheduler_options": {"sigma_schedule": "karras"},
    }


@pytest.mark.parametrize("sampler, schedule_type, expected", [
    ("DPM++ 2M", "Karras", ("dpmpp-2m", {"sigma_schedule": "karras"})),
    ("Euler a", "Automatic", ("euler-a", {})),
    ("DDIM", "Uniform", ("ddim", {"sigma_schedule": "default", "timestep_spacing": "linspace"})),
    ("UniPC", "Exponential", ("unipc", {"sigma_schedule": "exponential"})),
    ("DPM2 a", "Karras", ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True})),
    ("Restart", "Karras", None),  # no sampler of ours or diffusers': the other fields still fill
])
def test_a1111_19_sampler_and_schedule_type_fill_the_options(sampler, schedule_type, expected):
    text = f"a cat\nSteps: 20, Sampler: {sampler}, Schedule type: {schedule_type}, CFG scale: 7, Seed: 1"
    options = metadata.parameters_to_options(metadata.parse_parameters(text))
    assert options["seed"] == 1
    assert (options.get("scheduler"), options.get("scheduler_options")) == (expected or (None, None))


def test_prompt_only_text_has_no_parameters():
    assert metadata.parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_read_a_png_written_the_way_a1111_writes_it(tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    meta = metadata.read_png(tmp_path / "a1111.png")
    assert meta.recipe is None and meta.parameters["Model hash"] == "6ce0161689"


def test_png_round_trip_and_regeneration(pipe, tmp_path):
    swap_scheduler(pipe, "EulerDiscreteScheduler")
    out = pipe("a red circle, big", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
               guidance_schedule="cosine", guidance_interval=(0.5, 8.0), clip_skip=1, width=32, height=32, seed=77,
               progress_bar=False)
    path = metadata.write_png(tmp_path / "img.png", out.images[0], out.recipes[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no temporary left behind
    meta = metadata.read_png(path)
    assert meta.recipe == out.recipes[0]
    p = meta.parameters
    assert p["Prompt"] == "a red circle, big" and p["Negative prompt"] == "blurry"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == ("3", "Euler", "5.0", "77", "32x32")
    assert p["Schedule type"] == "Uniform"  # stock Euler, linspace spacing
    assert p["Model hash"] == "ab" * 5 and p["Model"] == "tiny" and p["Clip skip"] == "2"
    assert p["Guidance schedule"] == "cosine" and '"sigma_lo": 0.5' in p["Guidance interval"]
    assert meta.recipe["scheduler"]["config"]["prediction_type"] == "epsilon"
    assert set(meta.recipe["versions"]) >= {"diffusers", "torch", "transformers"}
    # regenerate from the recipe alone
    options = metadata.recipe_to_options(meta.recipe)
    swap_scheduler(pipe, meta.recipe["scheduler"]["class"])
    again = pipe(**options, progress_bar=False)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(Image.open(path)))
    assert metadata.parameters_to_options(p)["seed"] == 77


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError):
        metadata.write_png(tmp_path / "x.png", "not an image", {"prompt": "p"})
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_atomically(tmp_path):
    target = tmp_path / "x.png"
    metadata.write_png(target, Image.new("RGB", (8, 8), "red"), {"prompt": "first"})
    metadata.write_png(target, Image.new("RGB", (8, 8), "blue"), {"prompt": "second"})
    assert metadata.read_png(target).recipe == {"prompt": "second"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_custom_guidance_function_cannot_be_restored():
    recipe = {"prompt": "p", "steps": 2, "seed": 1, "width": 8, "height": 8,
              "guidance": {"scale": 5, "schedule": "callable:my_ramp"}}
    with pytest.raises(ValueError, match="custom guidance function"):
        metadata.recipe_to_options(recipe)
