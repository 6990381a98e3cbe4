"""Low-rank adapters through peft: LoRA (Hu et al. 2021), DoRA (Liu et al. 2024), LoHa (Hyeon-Woo et al.
2022, FedPara) and LoKr (Yeh et al. 2024, LyCORIS) on the UNet's attention projections and, optionally,
the CLIP text encoder's; saved by `training.lora_export`."""

from __future__ import annotations

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # as in diffusers' train_text_to_image_lora.py
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # as in diffusers' train_dreambooth_lora.py


def adapter_config(kind: str, rank: int, alpha: float | None, targets: list[str], use_dora: bool = False):
    """A peft config; the adapter starts as a zero update, so the model is unchanged before training."""
    if rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {rank}.")
    alpha = alpha or rank
    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                          use_dora=use_dora)
    if use_dora:
        raise ValueError(f"--use_dora applies to --lora_type lora only, not {kind}.")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    raise ValueError(f"Unknown --lora_type {kind!r}; choose lora, loha or lokr.")


def add_adapter(model: torch.nn.Module, kind: str, rank: int, alpha: float | None, targets: list[str],
                use_dora: bool = False) -> None:
    """Freeze `model` (a diffusers UNet or a transformers text encoder) and add a trainable adapter to it.

    peft's own injection (what `add_adapter` of diffusers and transformers calls): transformers 5's
    `add_adapter` insists on a peft release newer than the one on PyPI.
    """
    model.requires_grad_(False)
    inject_adapter_in_model(adapter_config(kind, rank, alpha, targets, use_dora), model)


def add_unet_lora(unet, rank: int, alpha: float | None = None, kind: str = "lora", use_dora: bool = False) -> None:
    add_adapter(unet, kind, rank, alpha, UNET_TARGETS, use_dora)


def add_text_encoder_lora(text_encoder, rank: int, alpha: float | None = None, kind: str = "lora",
                          use_dora: bool = False) -> None:
    add_adapter(text_encoder, kind, rank, alpha, TEXT_ENCODER_TARGETS, use_dora)
