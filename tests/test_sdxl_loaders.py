"""SDXL LoRAs (UNet + both text encoders), A1111 SDXL embeddings (clip_l + clip_g) and the half VAE's
`force_upcast`, in ours and in stock StableDiffusionXLPipeline; the CLI's --lora / --embedding on SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_pipeline.adapters import PickleRefused
from ldm_pipeline.sdxl import LatentSDXLPipeline
from training.lora import add_text_encoder_lora, add_unet_lora
from training.tiny_models import tiny_sdxl_components

SIZE = 32
PROMPT = "a red circle"


def _stock():
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours():
    return LatentSDXLPipeline(**tiny_sdxl_components())


def stock_image(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_inference_steps=3, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(5),
                output_type="np", guidance_scale=4.0, **kwargs).images[0]


def ours_image(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_inference_steps=3, width=SIZE, height=SIZE, seed=5, output_type="np", guidance_scale=4.0,
                progress_bar=False, **kwargs).images[0]


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    """A diffusers-format SDXL LoRA on the UNet and both text encoders (random B weights, as after training)."""
    parts = tiny_sdxl_components()
    add_unet_lora(parts["unet"], rank=4, alpha=2)
    for name in ("text_encoder", "text_encoder_2"):
        add_text_encoder_lora(parts[name], rank=4, alpha=2)
    generator = torch.Generator().manual_seed(1)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for key, weight in parts[name].named_parameters():
            if "lora_B" in key:
                weight.data = torch.randn(weight.shape, generator=generator) * 0.5
    folder = tmp_path_factory.mktemp("sdxl-lora")
    layers = {f"{name}_lora_layers": get_peft_model_state_dict(parts[name])
              for name in ("unet", "text_encoder", "text_encoder_2")}
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers, weight_name="tiny-sdxl-lora.safetensors")
    return folder / "tiny-sdxl-lora.safetensors"


def test_lora_on_both_encoders_matches_stock(sdxl_lora):
    ours, stock = _ours(), _stock()
    base = ours_image(ours)
    ours.load_lora_weights(str(sdxl_lora), adapter_name="tiny")
    stock.load_lora_weights(str(sdxl_lora), adapter_name="tiny")
    keys = load_file(str(sdxl_lora)).keys()
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert ours.text_encoder_2.peft_config and ours.text_encoder.peft_config  # both encoders got the adapter
    with_lora = ours_image(ours)
    assert np.abs(with_lora - base).max() > 1e-3
    np.testing.assert_allclose(with_lora, stock_image(stock), atol=1e-5)
    # the LoRA scale reaches both text encoders and the UNet, as stock's
    half = {"cross_attention_kwargs": {"scale": 0.5}}
    np.testing.assert_allclose(ours_image(ours, **half), stock_image(stock, **half), atol=1e-5)


def test_pickle_lora_is_refused(tmp_path):
    file = tmp_path / "lora.bin"
    torch.save({}, file)
    with pytest.raises(PickleRefused, match="pickle file"):
        _ours().load_lora_weights(str(file))


@pytest.fixture(scope="module")
def sdxl_embedding(tmp_path_factory):
    """An A1111 SDXL embedding: two vectors for each encoder (clip_l: encoder 1, clip_g: encoder 2)."""
    generator = torch.Generator().manual_seed(3)
    file = tmp_path_factory.mktemp("sdxl-emb") / "shinystyle.safetensors"
    save_file({"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 32, generator=generator)},
              str(file))
    return file


def test_sdxl_embedding_loads_into_both_encoders_as_stock(sdxl_embedding):
    ours, stock = _ours(), _stock()
    ours.load_textual_inversion(str(sdxl_embedding), token="shinystyle")
    state = load_file(str(sdxl_embedding))  # the diffusers docs' way: once per encoder
    stock.load_textual_inversion(state["clip_g"], token="shinystyle", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    stock.load_textual_inversion(state["clip_l"], token="shinystyle", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    prompt = "a shinystyle circle"
    got = ours_image(ours, prompt)
    np.testing.assert_allclose(got, stock_image(stock, prompt), atol=1e-5)
    assert np.abs(got - ours_image(ours, "a circle")).max() > 1e-3
    assert [r["name"] for r in ours.embedding_records] == ["shinystyle"] and ours.embedding_records[0]["hash"]
    row = ours.tokenizer_2.convert_tokens_to_ids("shinystyle")
    torch.testing.assert_close(ours.text_encoder_2.get_input_embeddings().weight[row], state["clip_g"][0])


def test_sdxl_embedding_needs_a_token(sdxl_embedding):
    with pytest.raises(ValueError, match="needs token="):
        _ours().load_textual_inversion(str(sdxl_embedding))


@pytest.mark.parametrize("force_upcast", [True, False])
def test_half_vae_decodes_in_float32_when_its_config_says_force_upcast(force_upcast):
    pipe = _ours()
    pipe.vae.register_to_config(force_upcast=force_upcast)
    pipe.vae.to(torch.float16)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = pipe._decode(latents.half(), "pt")
        reference = pipe.vae.float().decode(latents.half().float() / pipe.vae.config.scaling_factor).sample  # fp32
        pipe.vae.half()
    assert pipe.vae.dtype == torch.float16  # back to half after the decode
    expected = pipe.image_processor.postprocess(reference, output_type="pt")
    difference = (got.float() - expected).abs().max().item()
    assert (difference < 1e-5) if force_upcast else (1e-5 < difference < 1e-2)
    image = Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    with torch.no_grad():
        assert pipe._encode_image(image, 1, SIZE, SIZE).dtype == torch.float16  # encode works in either case


def test_a_shared_half_vae_decodes_right_while_other_threads_upcast_it():
    """Requests and previews share one half VAE that SDXL switches to float32 for each decode: each caller reads
    and switches its dtype under one lock (`_vae_precision`), so no decode meets the VAE mid-switch."""
    import concurrent.futures

    from ldm_pipeline.previews import VaePreviewer

    pipe = _ours()
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    preview = VaePreviewer(pipe.vae, "cpu", pipe._vae_precision)
    image = Image.fromarray(np.full((SIZE, SIZE, 3), 90, dtype=np.uint8))
    with torch.no_grad():
        decoded, previewed = pipe._decode(latents, "np"), preview.images(latents)
        encoded = pipe._encode_image(image, 1, SIZE, SIZE)
        jobs = [lambda: pipe._decode(latents, "np"), lambda: preview.images(latents),
                lambda: pipe._encode_image(image, 1, SIZE, SIZE)] * 40
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda job: torch.no_grad()(job)(), jobs))  # grad mode is per thread
    for i, result in enumerate(results):
        if i % 3 == 0:
            np.testing.assert_array_equal(result, decoded)
        elif i % 3 == 1:
            assert [np.asarray(p).tolist() for p in result] == [np.asarray(p).tolist() for p in previewed]
        else:
            assert result.dtype == torch.float16 and torch.equal(result, encoded)
    assert pipe.vae.dtype == torch.float16


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder)
    return folder


def test_cli_applies_sdxl_lora_and_embedding(sdxl_folder, sdxl_lora, sdxl_embedding, tmp_path):
    from ldm_pipeline.generate import main
    from ldm_pipeline.metadata import read_png

    args = ["a shinystyle circle", "--model", str(sdxl_folder), "--steps", "3", "--width", "32", "--height", "32",
            "--seed", "5", "--guidance", "4", "--lora", f"{sdxl_lora}:0.5", "--embedding", str(sdxl_embedding)]
    assert main([*args, "--out", str(tmp_path)]) == 0
    png = tmp_path / "00000_000.png"
    ours = _ours()
    ours.load_lora_weights(str(sdxl_lora), adapter_name="tiny")
    ours.set_adapters(["tiny"], adapter_weights=[0.5])
    ours.load_textual_inversion(str(sdxl_embedding), token="shinystyle")
    expected = ours_image(ours, "a shinystyle circle")
    got = np.asarray(Image.open(png), dtype=np.float32) / 255
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6  # one 8-bit level
    text = read_png(png).parameters_text
    assert "Lora hashes: \"tiny-sdxl-lora: " in text and "TI hashes: \"shinystyle: " in text


def test_lora_loaded_in_python_is_recorded(sdxl_lora):
    ours = _ours()
    ours.load_lora_weights(str(sdxl_lora), adapter_name="tiny")
    ours.set_adapters(["tiny"], adapter_weights=[0.5])
    recipe = ours(PROMPT, num_inference_steps=1, width=SIZE, height=SIZE, seed=1, progress_bar=False).recipes[0]
    assert [(r["name"], r["scale"]) for r in recipe["loras"]] == [("tiny-sdxl-lora", 0.5)]
