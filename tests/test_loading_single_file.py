"""Single-file `.safetensors` checkpoints (original LDM layout) through diffusers' `from_single_file`, offline.

`to_ldm_checkpoint` writes the tiny test components in the layout of the original
Stable Diffusion checkpoints (model.diffusion_model.*, first_stage_model.*,
cond_stage_model.transformer.*), so the test exercises the same path a real
SD 1.5 `.safetensors` file takes.
"""

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from ldm_pipeline import ModelLoadError, load_pipeline
from training.tiny_models import tiny_sd_components

SMALL = {"width": 32, "height": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "np", "seed": 3}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    for ours, ldm in RESNET.items():
        if rest.startswith(ours + "."):
            return ldm + rest[len(ours):]
    raise KeyError(rest)


def unet_key(key: str, layers: int) -> str:
    """diffusers UNet2DConditionModel key -> LDM `model.diffusion_model.` key (SD's UNetModel layout)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for ours, ldm in fixed.items():
        if key.startswith(ours + "."):
            return ldm + key[len(ours):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + b * (layers + 1) + layer
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = b * (layers + 1) + layer
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise KeyError(key)


def vae_key(key: str, blocks: int) -> str:
    """diffusers AutoencoderKL key -> LDM `first_stage_model.` key."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.([a-z_]+(?:\.0)?)\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def upsampler_keys(unet, layers: int) -> dict:
    """up_blocks.b.upsamplers -> output_blocks.<last layer of b>.<1 or 2>.conv (2 when the block has attention)."""
    out = {}
    for b, block in enumerate(unet.up_blocks):
        if block.upsamplers is None:
            continue
        position = 2 if getattr(block, "attentions", None) is not None else 1
        for name, tensor in block.upsamplers[0].conv.state_dict().items():
            out[f"output_blocks.{b * (layers + 1) + layers}.{position}.conv.{name}"] = tensor
    return out


def to_ldm_checkpoint(components: dict) -> dict:
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    layers = unet.config.layers_per_block
    state = {}
    for key, tensor in unet.state_dict().items():
        if ".upsamplers." not in key:
            state["model.diffusion_model." + unet_key(key, layers)] = tensor
    state.update({"model.diffusion_model." + k: v for k, v in upsampler_keys(unet, layers).items()})
    blocks = len(vae.config.block_out_channels)
    for key, tensor in vae.state_dict().items():
        ldm = vae_key(key, blocks)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        state["first_stage_model." + ldm] = tensor
    for key, tensor in text_encoder.state_dict().items():
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = tensor
    return {k: v.contiguous() for k, v in state.items()}


def write_single_file_model(root, components):
    """(LDM-layout .safetensors checkpoint, weightless diffusers config folder) for `components`."""
    file = root / "tiny-ldm.safetensors"
    save_file(to_ldm_checkpoint(components), str(file))
    config = root / "config"
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(str(config))
    for weights in config.rglob("*.safetensors"):
        weights.unlink()  # the config folder needs no weights: only configs and the tokenizer
    return file, config


@pytest.fixture(scope="module")
def checkpoint_and_config(tmp_path_factory):
    components = tiny_sd_components()
    file, config = write_single_file_model(tmp_path_factory.mktemp("single"), components)
    return file, config, components


def test_single_file_loads_offline_and_matches_the_components(checkpoint_and_config):
    file, config, components = checkpoint_and_config
    pipe = load_pipeline(file, config=config, device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        original, loaded = getattr(pipe, name).state_dict(), components[name].state_dict()
        assert original.keys() == loaded.keys()
        for key in original:
            torch.testing.assert_close(original[key], loaded[key], msg=f"{name}.{key}")
    from ldm_pipeline import LatentTextToImagePipeline

    reference = LatentTextToImagePipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                         "scheduler")})
    np.testing.assert_allclose(pipe("a red circle", **SMALL).images, reference("a red circle", **SMALL).images,
                               atol=1e-6)
    assert len(pipe.model_hash) == 64 and pipe.model_id == str(file)


def test_single_file_with_a_config_folder_that_is_not_one(checkpoint_and_config, tmp_path):
    file, _, _ = checkpoint_and_config
    with pytest.raises(ModelLoadError, match="config= must be a diffusers folder"):
        load_pipeline(file, config=tmp_path)
