"""Tiny, seeded Stable-Diffusion-shaped components built from configs (no downloads).

Shared by the scheduler, pipeline, training, evaluation and UI tests and by
`benchmarks/pipeline_overhead.py`, in the spirit of diffusers' `get_dummy_components`.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.shapes import COLORS, POSITIONS, SHAPES, SIZES
from training.tokenizer import build_clip_tokenizer

WORDS = (
    "a an the on at in of and with background photo picture image".split()
    + list(SHAPES) + list(COLORS) + list(SIZES) + [w for p in POSITIONS for w in p.split()]
)

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


def tiny_tokenizer(directory: str | None = None):
    return build_clip_tokenizer(WORDS, directory or tempfile.mkdtemp(prefix="tiny-tok-"))


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=32, sample_size=32,
    ).eval()


def tiny_sd_components(seed: int = 0, scheduler=None) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler: ready for `StableDiffusionPipeline(**c)`."""
    tokenizer = tiny_tokenizer()
    return {
        "unet": tiny_unet(seed),
        "vae": tiny_vae(seed),
        "text_encoder": tiny_text_encoder(len(tokenizer), seed),
        "tokenizer": tokenizer,
        "scheduler": scheduler or DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }
