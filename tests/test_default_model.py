"""The embedded default model: it loads in ours and in stock diffusers, and it follows prompts.

The quality test is end to end: 8 fixed canonical prompts of seen combinations, generated with
the shipped default sampler, read by the independent judge (`evaluation.judge`). A model with
re-initialised (untrained) weights of the same architecture fails the same check.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel

from evaluation import judge
from evaluation.adherence import evaluation_combinations, generate, roundtrip_scores
from ldm_pipeline import load_pipeline
from ldm_pipeline.loading import DEFAULT_MODEL_DIR
from training import shapes
from training.shapes import Attributes

# Recorded at export (docs/default_model.md): parameter counts and what the shipped files hold.
RECORD = json.loads((DEFAULT_MODEL_DIR / "record.json").read_text()) if (DEFAULT_MODEL_DIR / "record.json").is_file() else None
MAX_TOTAL_BYTES = 25 * 1024 * 1024
PROMPT_SEED = 4321
QUALITY_PROMPTS = [
    Attributes("circle", "red", "blue", "large", "top left"),
    Attributes("square", "yellow", "black", "small", "bottom right"),
    Attributes("triangle", "white", "green", "large", "center"),
    Attributes("circle", "purple", "orange", "small", "top right"),
    Attributes("square", "green", "white", "large", "bottom left"),
    Attributes("triangle", "orange", "purple", "large", "top right"),
    Attributes("circle", "black", "yellow", "large", "bottom right"),
    Attributes("square", "blue", "red", "small", "center"),
]


def test_quality_prompts_are_seen_combinations():
    assert not any(shapes.is_held_out(a) for a in QUALITY_PROMPTS)


def test_shipped_folder_is_safetensors_and_small():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= MAX_TOTAL_BYTES
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)


def _stored_dtypes(component: str) -> set[str]:
    (file,) = (DEFAULT_MODEL_DIR / component).glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_loads_in_stock_diffusers_with_recorded_shapes_and_dtypes():
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        assert _parameters(module) == RECORD[name]["parameters"], name
        assert module.dtype == torch.float32  # stored in RECORD[name]["stored_dtype"], loaded as fp32
        assert _stored_dtypes(name) == {RECORD[name]["stored_dtype"]}
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.in_channels == 4
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.prediction_type == RECORD["scheduler"]["prediction_type"]
    assert pipe.scheduler.config.timestep_spacing == RECORD["scheduler"]["timestep_spacing"]
    assert pipe.safety_checker is None
    image = pipe("a large red circle on a blue background at the top left", num_inference_steps=4,
                 height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_load_pipeline_without_a_model_is_the_default_model():
    pipe = load_pipeline()
    assert pipe.model_id == str(DEFAULT_MODEL_DIR)
    assert pipe.recommended == RECORD["defaults"]  # what ldm-generate and the app use when not told
    assert _parameters(pipe.unet) == RECORD["unet"]["parameters"]
    assert pipe.unet.dtype == torch.float32
    assert pipe.scheduler.config.prediction_type == RECORD["scheduler"]["prediction_type"]


def _passes(pipe) -> list[bool]:
    images = pipe(
        [a.caption() for a in QUALITY_PROMPTS], seed=[PROMPT_SEED + k for k in range(len(QUALITY_PROMPTS))],
        height=64, width=64, progress_bar=False,
        num_inference_steps=RECORD["defaults"]["num_inference_steps"],
        guidance_scale=RECORD["defaults"]["guidance_scale"],
    ).images
    return [all(judge.read_attributes(image).matches(a).values()) for image, a in zip(images, QUALITY_PROMPTS)]


def test_default_model_follows_canonical_prompts():
    passes = _passes(load_pipeline())
    assert sum(passes) >= 7, passes


def test_the_quality_check_fails_an_untrained_model():
    pipe = load_pipeline()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config)  # same architecture, fresh weights
    assert sum(_passes(pipe)) < 7


def test_shipped_vae_reconstructs_generator_images():
    """The decoder is no ceiling: the judge reads VAE round trips of generator images right; a fresh decoder fails."""
    samples = shapes.generate(11, 200, "train")
    vae = load_pipeline().vae
    assert roundtrip_scores(vae, samples).all_correct >= 0.97
    torch.manual_seed(0)
    fresh = AutoencoderKL.from_config(vae.config)
    fresh.encoder.load_state_dict(vae.encoder.state_dict())
    fresh.quant_conv.load_state_dict(vae.quant_conv.state_dict())
    assert roundtrip_scores(fresh, samples).all_correct < 0.5


@pytest.mark.parametrize("guidance, strict_at_least", [(3.0, 13), (7.5, 10)])
def test_strict_size_quality_at_the_recommended_and_a_high_guidance(guidance, strict_at_least):
    """Issue 18's strict reading of the spec (small = 14-18 px, large = 28-34 px wide) at 10 steps, 16 seen and 16
    held-out prompts. The issue's target (98% at every guidance from 1 to 7.5) is NOT reached: the shipped model
    reads 15/16 and 15/16 here at guidance 3, 13/16 and 12/16 at 7.5 (seen, held out) (docs/quality_study.md: the decoder's round
    trip alone caps strict size at 92%). The thresholds keep a margin of two to three prompts below that; the
    thresholded reading stays at 15/16 or better."""
    combos = evaluation_combinations(16)
    pipe = load_pipeline()
    for split, expected in combos.items():
        images = generate(pipe, [a.caption() for a in expected], 10, guidance, 32)
        scores = judge.score(zip(images, expected))
        assert scores.all_correct >= 15 / 16, (split, scores)
        assert scores.all_correct_strict >= strict_at_least / 16, (split, scores)
