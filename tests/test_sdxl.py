"""SDXL on our denoising loop equals stock StableDiffusionXLPipeline with the same tiny components."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from ldm_pipeline.options import InvalidOptions
from ldm_pipeline.pipeline import LatentTextToImagePipeline
from ldm_pipeline.sdxl import LatentSDXLPipeline
from training.tiny_models import tiny_sd_components, tiny_sdxl_components

SIZE = 32
CONDITIONING = dict(original_size=(48, 40), crops_coords_top_left=(4, 8), target_size=(32, 32),
                    negative_original_size=(24, 24), negative_target_size=(40, 32))


@pytest.fixture(scope="module", params=["euler", "ddim"])
def pipes(request):
    components = tiny_sdxl_components()
    if request.param == "ddim":
        components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config)
    stock = StableDiffusionXLPipeline(**components)
    ours = LatentSDXLPipeline(**components)
    return stock, ours


def _stock(stock, seed, **kwargs):
    return stock(generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=3, height=SIZE, width=SIZE,
                 output_type="np", **kwargs).images


def _ours(ours, seed, **kwargs):
    return ours(seed=seed, num_inference_steps=3, height=SIZE, width=SIZE, output_type="np", progress_bar=False,
                **kwargs).images


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_txt2img_matches_stock(pipes, guidance):
    stock, ours = pipes
    kwargs = dict(prompt="red circle", prompt_2="blue square", guidance_scale=guidance, **CONDITIONING)
    expected, got = _stock(stock, 3, **kwargs), _ours(ours, 3, **kwargs)
    assert got.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert abs(got - expected).max() < 1e-6, abs(got - expected).max()


def test_negative_prompt_pair_matches_stock(pipes):
    stock, ours = pipes
    kwargs = dict(prompt="red circle", negative_prompt="green", negative_prompt_2="small", guidance_scale=4.0)
    np.testing.assert_allclose(_ours(ours, 5, **kwargs), _stock(stock, 5, **kwargs), atol=1e-5)


def test_size_conditioning_changes_the_image(pipes):
    _, ours = pipes
    a = _ours(ours, 1, prompt="red circle", guidance_scale=1.0)
    b = _ours(ours, 1, prompt="red circle", guidance_scale=1.0, original_size=(512, 512))
    assert np.abs(a - b).max() > 1e-4


def test_long_prompt_uses_windows_for_both_encoders(pipes):
    _, ours = pipes
    long = " ".join(["red circle"] * 60)  # 120 tokens: two windows
    embeds = ours._embeddings(ours_options(long), [long], with_uncond=True)
    assert embeds.cond.shape == (1, 2 * 77, 64) and embeds.uncond.shape == embeds.cond.shape
    assert embeds.cond_added["text_embeds"].shape == (1, 32)


def ours_options(prompt):
    from ldm_pipeline.options import GenerationOptions
    return GenerationOptions(prompt=prompt, height=SIZE, width=SIZE).with_defaults()


def test_img2img_and_inpainting_run_on_sdxl(pipes):
    # The init latents are the seed's VAE posterior sample, as stock draws them (SD parity: test_stock_call_parity).
    _, ours = pipes
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    out = ours("red circle", image=init, mask_image=mask, strength=0.5, num_inference_steps=4, seed=1,
               output_type="np", progress_bar=False)
    assert out.unet_evaluations == 2 * 2 and out.images.shape == (1, SIZE, SIZE, 3)
    # an all-black mask keeps the image: the result is the init image through the VAE
    with torch.no_grad():
        kept = ours._decode(ours._encode_image(init, 1, SIZE, SIZE, [torch.Generator().manual_seed(1)]), "np")
    np.testing.assert_allclose(out.images, kept, atol=1e-5)


def test_sdxl_options_refused_on_sd_model():
    components = tiny_sd_components()
    pipe = LatentTextToImagePipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    with pytest.raises(InvalidOptions, match="prompt_2, original_size only apply to SDXL"):
        pipe("red circle", prompt_2="blue", original_size=(64, 64), num_inference_steps=1)


def test_bad_size_conditioning_is_refused(pipes):
    _, ours = pipes
    with pytest.raises(InvalidOptions, match="target_size must be two whole numbers"):
        _ours(ours, 0, prompt="red circle", target_size=(32,))


# ---------------------------------------------------------------- loading and the CLI


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder)
    return folder


def test_load_pipeline_detects_sdxl(sdxl_folder, caplog):
    import logging

    from ldm_pipeline.loading import load_pipeline
    with caplog.at_level(logging.INFO, logger="ldm_pipeline.loading"):
        pipe = load_pipeline(sdxl_folder)
    assert isinstance(pipe, LatentSDXLPipeline) and pipe.family == "sdxl"
    assert "loaded a Stable Diffusion XL model" in caplog.text
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    kwargs = dict(prompt="red circle", prompt_2="blue", guidance_scale=3.0)
    np.testing.assert_allclose(_ours(pipe, 4, **kwargs), _stock(stock, 4, **kwargs), atol=1e-5)


@pytest.mark.parametrize("class_name, component", [("StableDiffusion3Pipeline", "transformer"),
                                                   ("FluxPipeline", "transformer")])
def test_unsupported_families_are_refused(tmp_path, class_name, component):
    import json

    from ldm_pipeline.loading import ModelLoadError, load_pipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name,
                                                           component: ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(ModelLoadError, match=f"a {class_name} model .*Use the stock diffusers pipeline"):
        load_pipeline(tmp_path)


def test_cli_generates_with_sdxl(sdxl_folder, tmp_path):
    from ldm_pipeline.generate import main
    from ldm_pipeline.metadata import read_png
    assert main(["red circle", "--prompt-2", "blue square", "--negative-2", "green", "--model", str(sdxl_folder),
                 "--out", str(tmp_path), "--steps", "2", "--width", "32", "--height", "32", "--seed", "1"]) == 0
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (SIZE, SIZE)
    assert read_png(pngs[0]).recipe["sdxl"] == {"prompt_2": "blue square", "negative_prompt_2": "green"}


def test_cli_prompt_file_takes_sdxl_keys(sdxl_folder, tmp_path):
    import json

    from ldm_pipeline.generate import main
    from ldm_pipeline.metadata import read_png
    lines = [{"prompt": "red circle", "prompt_2": "blue", "original_size": [48, 40], "crops_coords_top_left": [4, 8]},
             {"prompt": "red circle"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    assert main(["--prompts", str(prompts), "--model", str(sdxl_folder), "--out", str(out), "--steps", "2",
                 "--width", "32", "--height", "32", "--guidance", "1"]) == 0
    recipes = [read_png(out / f"{i:05d}_000.png").recipe for i in range(2)]
    assert recipes[0]["sdxl"] == {"prompt_2": "blue", "original_size": [48, 40], "crops_coords_top_left": [4, 8]}
    assert "sdxl" not in recipes[1]
    pipe = LatentSDXLPipeline.from_pretrained(sdxl_folder)
    expected = pipe(seed=recipes[0]["seed"], guidance_scale=1.0, num_inference_steps=2, height=SIZE, width=SIZE,
                    output_type="np", progress_bar=False,
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in lines[0].items()}).images
    got = np.asarray(Image.open(out / "00000_000.png"), dtype=np.float32)[None] / 255
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6


# ---------------------------------------------------------------- recipes and the A1111 infotext


def test_recipe_and_infotext_reproduce_an_sdxl_image(pipes, tmp_path):
    from ldm_pipeline import metadata
    from ldm_pipeline.options import GenerationOptions

    _, ours = pipes
    kwargs = dict(prompt="red circle", prompt_2="blue square", negative_prompt="green", guidance_scale=4.0,
                  **CONDITIONING)
    out = ours(seed=7, num_inference_steps=3, height=SIZE, width=SIZE, progress_bar=False, **kwargs)
    recipe = out.recipes[0]
    assert recipe["sdxl"] == {"prompt_2": "blue square", "original_size": [48, 40], "crops_coords_top_left": [4, 8],
                              "target_size": [32, 32], "negative_original_size": [24, 24],
                              "negative_target_size": [40, 32]}
    png = metadata.write_png(tmp_path / "x.png", out.images[0], recipe)
    found = metadata.read_png(png)
    again = ours(**GenerationOptions.from_recipe(found.recipe, output_type="np", progress_bar=False).kwargs()).images
    np.testing.assert_allclose(again, np.asarray(out.images[0], dtype=np.float32)[None] / 255, atol=1 / 255 + 1e-6)
    from_text = metadata.parameters_to_options(found.parameters)
    assert from_text["prompt_2"] == "blue square" and from_text["crops_coords_top_left"] == (4, 8)
    # without SDXL options the infotext has A1111's fields only, as A1111 writes them for SDXL images
    plain = ours(seed=7, num_inference_steps=2, height=SIZE, width=SIZE, progress_bar=False, prompt="red circle")
    text = metadata.format_parameters(plain.recipes[0])
    assert "SDXL" not in text and "sdxl" not in plain.recipes[0] and "Size: 32x32" in text


def test_a1111_sdxl_infotext_becomes_options():
    from ldm_pipeline import metadata
    text = ("a red circle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1, Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.10.1")
    options = metadata.parameters_to_options(metadata.parse_parameters(text))
    assert (options["width"], options["height"], options["prompt"]) == (1024, 1024, "a red circle")
    assert not set(options) & {"prompt_2", "original_size", "target_size"}  # A1111: the image size, one prompt


def test_onnx_backend_and_export_refuse_sdxl_by_name(sdxl_folder, tmp_path):
    from ldm_pipeline.loading import ModelLoadError, load_pipeline
    from ldm_pipeline.onnx_export import main as export_main
    with pytest.raises(ModelLoadError, match="an SDXL model; the ONNX backend exports and runs SD 1.x / 2.x"):
        load_pipeline(sdxl_folder, backend="onnx")
    assert export_main([str(sdxl_folder), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_prompt_editing_equals_stock_with_embeddings_swapped_at_a1111_step(pipes):
    # [red:blue:0.25] at 4 steps: A1111's schedule [(1, red), (4, blue)] conditions steps 0-1 on red, 2-3 on blue
    stock, ours = pipes
    blue, _, blue_pooled, _ = stock.encode_prompt("blue", device="cpu", do_classifier_free_guidance=False)

    def swap(_pipe, i, _t, kwargs):
        return {"prompt_embeds": blue, "add_text_embeds": blue_pooled} if i == 1 else {}
    expected = stock("red", generator=torch.Generator("cpu").manual_seed(2), num_inference_steps=4, height=SIZE,
                     width=SIZE, output_type="np", guidance_scale=1.0, callback_on_step_end=swap,
                     callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"]).images
    got = ours("[red:blue:0.25]", seed=2, num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
               guidance_scale=1.0, progress_bar=False).images
    assert abs(got - expected).max() < 1e-6, abs(got - expected).max()
    plain = ours("red", seed=2, num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
                 guidance_scale=1.0, progress_bar=False).images
    assert abs(got - plain).max() > 1e-4  # the tiny model's text sensitivity is small but far above 1e-6
