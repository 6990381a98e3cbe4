"""LoRA (Hu et al. 2021) on the UNet's attention projections through peft, saved for `pipe.load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ldm_pipeline.atomic import atomic_directory

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # as in diffusers' train_text_to_image_lora.py


def add_unet_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None = None) -> None:
    """Freeze the UNet and add trainable rank-`rank` adapters (B = 0 at start, so the model is unchanged)."""
    if rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {rank}.")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))


def save_lora(directory: Path, unet: UNet2DConditionModel) -> Path:
    """pytorch_lora_weights.safetensors in diffusers' format, written atomically."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    with atomic_directory(directory) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    return directory
