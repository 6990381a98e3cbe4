"""A single-file SDXL checkpoint (the original SGM layout of `sd_xl_base_1.0.safetensors`) written from a tiny
SDXL folder loads offline with a local config folder (`--config`) and makes the folder's images.

Layout: `model.diffusion_model.*` (the UNet; `label_emb.0.*` = the added-conditioning MLP),
`first_stage_model.*` (VAE), `conditioner.embedders.0.transformer.*` (CLIP ViT-L in transformers' layout) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG: `resblocks`, fused `in_proj` q/k/v, `text_projection` as
[hidden, projection]). diffusers tells the two encoders apart by width (768 vs 1280), so the tiny encoders here
differ in width too (32 and 48).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ldm_pipeline import load_pipeline
from ldm_pipeline.sdxl import LatentSDXLPipeline
from tests.test_loading_single_file import unet_key, upsampler_keys, vae_key
from training.tiny_models import tiny_sdxl_components

SMALL = dict(width=32, height=32, num_inference_steps=2, progress_bar=False, output_type="np", seed=3,
             guidance_scale=4.0)
OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def wide_encoder_2_components() -> dict:
    """tiny_sdxl_components with a 48-wide second encoder (UNet cross-attention 32 + 48 = 80)."""
    parts = tiny_sdxl_components()
    vocab = len(parts["tokenizer_2"])
    config = CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=48,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab,
                            projection_dim=32, max_position_embeddings=77, hidden_act="gelu")
    torch.manual_seed(1)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(config).eval()
    parts["unet"] = UNet2DConditionModel.from_config(parts["unet"].config, cross_attention_dim=80).eval()
    return parts


def open_clip_state(encoder) -> dict:
    """transformers' CLIPTextModelWithProjection -> OpenCLIP keys (the inverse of diffusers'
    `convert_open_clip_checkpoint`)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    for i in range(encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for ours, theirs in OPEN_CLIP.items():
                out[f"transformer.resblocks.{i}.{theirs}.{kind}"] = state.pop(f"{layer}{ours}.{kind}")
    state.pop("embeddings.position_ids", None)
    assert not state, f"unconverted keys: {sorted(state)}"
    return out


def to_sgm_checkpoint(parts: dict) -> dict:
    unet, vae = parts["unet"], parts["vae"]
    layers, blocks = unet.config.layers_per_block, len(vae.config.block_out_channels)
    added = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    state = {}
    for key, tensor in unet.state_dict().items():
        if ".upsamplers." in key:
            continue
        module, _, kind = key.rpartition(".")
        ldm = f"{added[module]}.{kind}" if module in added else unet_key(key, layers)
        state["model.diffusion_model." + ldm] = tensor
    state.update({"model.diffusion_model." + k: v for k, v in upsampler_keys(unet, layers).items()})
    for key, tensor in vae.state_dict().items():
        ldm = vae_key(key, blocks)
        state["first_stage_model." + ldm] = tensor[:, :, None, None] if ".mid.attn_1." in ldm and tensor.ndim == 2 \
            else tensor
    for key, tensor in parts["text_encoder"].state_dict().items():
        state["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = tensor
    state.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip_state(parts["text_encoder_2"]).items()})
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-single")
    parts = wide_encoder_2_components()
    folder = root / "folder"
    StableDiffusionXLPipeline(**parts).save_pretrained(folder)
    config = root / "config"
    StableDiffusionXLPipeline(**parts).save_pretrained(config)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()  # a config folder: configs and tokenizers only
    file = root / "tiny-sdxl.safetensors"
    save_file(to_sgm_checkpoint(parts), str(file))
    return file, config, folder


def test_single_file_sdxl_matches_its_folder(checkpoint):
    file, config, folder = checkpoint
    pipe = load_pipeline(file, config=config, device="cpu")
    reference = load_pipeline(folder, device="cpu")
    assert isinstance(pipe, LatentSDXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded, expected = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        for key in expected:
            torch.testing.assert_close(loaded[key], expected[key], msg=f"{name}.{key}")
    kwargs = dict(prompt="a red circle", prompt_2="a blue square", **SMALL)
    np.testing.assert_allclose(pipe(**kwargs).images, reference(**kwargs).images, atol=1e-6)


def test_cli_runs_a_single_file_sdxl_checkpoint(checkpoint, tmp_path):
    from ldm_pipeline.generate import main

    file, config, _ = checkpoint
    assert main(["a red circle", "--model", str(file), "--config", str(config), "--out", str(tmp_path),
                 "--steps", "2", "--width", "32", "--height", "32"]) == 0
    assert Image.open(tmp_path / "00000_000.png").size == (32, 32)
