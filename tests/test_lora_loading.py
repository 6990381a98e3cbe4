"""diffusers' LoRA and textual-inversion loaders on our pipeline, against stock StableDiffusionPipeline."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from ldm_pipeline import LatentTextToImagePipeline, metadata
from ldm_pipeline.adapters import PickleRefused, file_hash, lora_hash
from ldm_pipeline.options import GenerationOptions
from training.lora import add_text_encoder_lora, add_unet_lora
from training.lora_export import DIFFUSERS_FILE, KOHYA_FILE, save_adapters
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components

PIPE_KEYS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
PROMPT = "a red circle on a blue background"


def components():
    return tiny_sd_components(scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG))


def ours():
    return LatentTextToImagePipeline(**{k: v for k, v in components().items() if k in PIPE_KEYS})


def stock():
    pipe = StableDiffusionPipeline(**components(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_image(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_inference_steps=3, width=32, height=32, seed=5, output_type="np", progress_bar=False,
                **kwargs).images[0]


def stock_image(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt, num_inference_steps=3, width=32, height=32, generator=[torch.Generator().manual_seed(5)],
                output_type="np", **kwargs).images[0]


def write_lora(directory, seed: int):
    """A LoRA as our training writes it (training.lora + training.lora_export), its B weights set as a run would."""
    parts = components()
    add_unet_lora(parts["unet"], rank=4, alpha=2)
    add_text_encoder_lora(parts["text_encoder"], rank=4, alpha=2)
    generator = torch.Generator().manual_seed(seed)
    for model in (parts["unet"], parts["text_encoder"]):
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.data = torch.randn(weight.shape, generator=generator) * 0.5
    return save_adapters(directory, parts["unet"], parts["text_encoder"], lora_format="both")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return write_lora(root / "a", seed=1), write_lora(root / "b", seed=2)


@pytest.fixture(scope="module")
def base_image():
    return ours_image(ours())


@pytest.mark.parametrize("weight_name", [DIFFUSERS_FILE, KOHYA_FILE])
def test_lora_gives_the_stock_image_and_scale_zero_the_base_image(loras, base_image, weight_name):
    pipes = ours(), stock()
    for pipe in pipes:
        pipe.load_lora_weights(loras[0], weight_name=weight_name)
    for scale in (1.0, 0.6):
        got = ours_image(pipes[0], cross_attention_kwargs={"scale": scale})
        np.testing.assert_allclose(got, stock_image(pipes[1], cross_attention_kwargs={"scale": scale}), atol=1e-5)
        assert np.abs(got - base_image).max() > 1e-3
    np.testing.assert_allclose(ours_image(pipes[0], cross_attention_kwargs={"scale": 0.0}), base_image, atol=1e-6)


def test_two_adapters_with_weights_equal_stock(loras, base_image):
    pipes = ours(), stock()
    for pipe in pipes:
        pipe.load_lora_weights(loras[0], weight_name=DIFFUSERS_FILE, adapter_name="a")
        pipe.load_lora_weights(loras[1], weight_name=KOHYA_FILE, adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.8])
    both = ours_image(pipes[0])
    np.testing.assert_allclose(both, stock_image(pipes[1]), atol=1e-5)
    pipes[0].set_adapters(["a"], adapter_weights=[0.5])
    assert np.abs(ours_image(pipes[0]) - both).max() > 1e-3


def test_fused_equals_unfused_and_unload_gives_the_base_image(loras, base_image):
    pipe = ours()
    pipe.load_lora_weights(loras[0], weight_name=KOHYA_FILE)
    unfused = ours_image(pipe)
    pipe.fuse_lora()
    np.testing.assert_allclose(ours_image(pipe), unfused, atol=1e-4)
    pipe.unfuse_lora()
    np.testing.assert_allclose(ours_image(pipe), unfused, atol=1e-5)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(ours_image(pipe), base_image, atol=1e-5)  # unfuse leaves float rounding in W


def test_recipes_name_and_hash_loras_and_embeddings_loaded_directly(loras, tmp_path):
    pipe = ours()
    pipe.load_lora_weights(loras[0], weight_name=DIFFUSERS_FILE, adapter_name="a")
    pipe.load_lora_weights(loras[1], weight_name=KOHYA_FILE, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.8])
    path = tmp_path / "shape.safetensors"
    save_file({"<shape>": embedding(pipe)}, str(path))
    pipe.load_textual_inversion(str(path))
    out = pipe(PROMPT, num_inference_steps=3, width=32, height=32, seed=5, progress_bar=False,
               cross_attention_kwargs={"scale": 0.7})
    recipe = out.recipes[0]
    assert recipe["loras"] == [
        {"name": Path(DIFFUSERS_FILE).stem, "hash": lora_hash(Path(loras[0]) / DIFFUSERS_FILE), "scale": 0.5},
        {"name": Path(KOHYA_FILE).stem, "hash": lora_hash(Path(loras[1]) / KOHYA_FILE), "scale": 0.8}]
    assert recipe["embeddings"] == [{"name": "shape", "hash": file_hash(path)}]
    assert recipe["cross_attention_kwargs"] == {"scale": 0.7}
    text = json.dumps(recipe) + metadata.format_parameters(recipe)
    assert str(tmp_path) not in text and str(loras[0]) not in text  # names and hashes, never paths
    again = pipe(**GenerationOptions.from_recipe(recipe, output_type="pil", progress_bar=False).kwargs())
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(out.images[0]))
    pipe.disable_lora()
    assert "loras" not in pipe(PROMPT, num_inference_steps=1, width=32, height=32, progress_bar=False).recipes[0]
    pipe.enable_lora()
    pipe.unload_lora_weights()
    assert "loras" not in pipe(PROMPT, num_inference_steps=1, width=32, height=32, progress_bar=False).recipes[0]


def embedding(pipe, seed=3):
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def test_textual_inversion_changes_the_image_only_where_its_token_is_used(tmp_path, base_image):
    pipe, reference = ours(), stock()
    path = tmp_path / "shape.safetensors"
    save_file({"<shape>": embedding(pipe)}, str(path))
    for p in (pipe, reference):
        p.load_textual_inversion(str(path))
    np.testing.assert_allclose(ours_image(pipe), base_image, atol=1e-6)  # token absent: the base image
    with_token = ours_image(pipe, "a red <shape> on a blue background")
    assert np.abs(with_token - base_image).max() > 1e-3
    np.testing.assert_allclose(with_token, stock_image(reference, "a red <shape> on a blue background"), atol=1e-5)


class Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for malicious code in a .pt file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_embeddings_load_only_with_allow_pickle_and_never_run_code(tmp_path):
    pipe = ours()
    marker, planted = tmp_path / "pwned", tmp_path / "planted.pt"
    planted.write_bytes(pickle.dumps({"string_to_param": {"*": Payload(marker)}}))
    with pytest.raises(PickleRefused, match="planted.pt is a pickle file.*allow_pickle=True"):
        pipe.load_textual_inversion(str(planted), token="<x>")
    with pytest.raises(Exception):  # even when allowed, diffusers unpickles weights only
        pipe.load_textual_inversion(str(planted), token="<x>", allow_pickle=True)
    assert not marker.exists()
    a1111 = tmp_path / "style.pt"  # an A1111 embedding: {'string_to_param': {'*': [vectors, dim]}, ...}
    torch.save({"string_to_param": {"*": embedding(pipe)[None]}, "name": "style", "step": 100}, a1111)
    with pytest.raises(PickleRefused):
        pipe.load_textual_inversion(str(a1111), token="<style>")
    pipe.load_textual_inversion(str(a1111), token="<style>", allow_pickle=True)
    assert "<style>" in pipe.tokenizer.get_vocab()


def test_lora_scale_must_be_a_number():
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['scale'\].*finite number"):
        ours()(PROMPT, cross_attention_kwargs={"scale": "high"})
