"""Tiny, seeded Stable-Diffusion-shaped components built from configs (no downloads).

Shared by the scheduler, pipeline, training, evaluation and UI tests and by
`benchmarks/pipeline_overhead.py`, in the spirit of diffusers' `get_dummy_components`.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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


def tiny_sdxl_components(seed: int = 0, scheduler=None) -> dict:
    """SDXL's components sized as diffusers' own SDXL tests build them (test_stable_diffusion_xl.py
    `get_dummy_components`): two CLIP encoders of width 32 (the second with a 32-d projection),
    a `text_time` UNet (8-d time embeddings: 6 * 8 + 32 = 80 added features, cross-attention 64)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    ).eval()
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    config = CLIPTextConfig(
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=vocab, hidden_act="gelu",
        projection_dim=32, max_position_embeddings=77,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading")
    return {"unet": unet, "scheduler": scheduler, "vae": tiny_vae(seed), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tiny_tokenizer()}


def tiny_ip_adapter(unet: UNet2DConditionModel, folder, seed: int = 0, image_size: int = 32) -> str:
    """A seeded IP-Adapter for `unet` (the plain kind: a linear `image_proj` to 4 tokens and `to_k_ip` /
    `to_v_ip` per cross-attention layer, numbered 1, 3, 5... as the original checkpoints) and a tiny
    `CLIPVisionModelWithProjection` in `folder/image_encoder`; returns the weight file name for
    `pipe.load_ip_adapter(folder, subfolder="", weight_name=...)`."""
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=image_size, patch_size=4)).eval()
    encoder.save_pretrained(Path(folder) / "image_encoder")
    dim, tokens = unet.config.cross_attention_dim, 4
    weights = {"image_proj.proj.weight": torch.randn(dim * tokens, 32) * 0.1,
               "image_proj.proj.bias": torch.zeros(dim * tokens),
               "image_proj.norm.weight": torch.ones(dim), "image_proj.norm.bias": torch.zeros(dim)}
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for key_id, name in zip(range(1, 2 * len(cross), 2), cross):
        hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
        for part in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key_id}.{part}.weight"] = torch.randn(hidden, dim) * 0.3
    save_file(weights, str(Path(folder) / "ip_adapter.safetensors"))
    return "ip_adapter.safetensors"
