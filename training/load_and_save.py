"""Model loading (SD folder, single file, from-scratch configs, a trained VAE) and saving.

What is written is always safetensors, atomically (a temporary folder renamed into
place), and the saved scheduler config describes the objective actually trained:
prediction type, noise schedule, zero-terminal-SNR rescale and trailing spacing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm_pipeline.atomic import atomic_directory
from training.config import ModelOptions, ObjectiveOptions
from training.objectives import BETA_SCHEDULE_NAMES
from training.tokenizer import build_clip_tokenizer

logger = logging.getLogger(__name__)

SCRATCH_FILES = ("unet.json", "vae.json", "text_encoder.json")
DEFAULT_SCHEDULER_CONFIG = {  # from scratch, unless scheduler.json or flags say otherwise
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
}


@dataclass
class Components:
    """The parts of a Stable-Diffusion-layout model, plus the scheduler config it came with; an SDXL model
    also has `text_encoder_2` (with projection) and `tokenizer_2` (`training.sdxl`)."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None
    tokenizer: CLIPTokenizer | None
    scheduler_config: dict
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def family(self) -> str:
        """"sdxl" with a second text encoder, else "sd" (as `ldm_pipeline.loading.model_family` names them)."""
        return "sd" if self.text_encoder_2 is None else "sdxl"

    @property
    def tokenizers(self):
        """What `data.tokenize` takes: the tokenizer, or SDXL's pair (tokenizer, tokenizer_2)."""
        return self.tokenizer if self.text_encoder_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]


# ---------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; --from_scratch needs {', '.join(SCRATCH_FILES)} in that folder.")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"--from_scratch {path.parent}: {path.name} is not valid JSON ({error}).") from None


def vae_path(path: str | Path) -> Path:
    """A VAE folder: the folder itself if it holds an AutoencoderKL config, else its vae/ subfolder."""
    path = Path(path)
    for candidate in (path, path / "vae"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
            return candidate
    raise FileNotFoundError(f"No AutoencoderKL at {path} (looked for config.json there and in vae/).")


def load_vae(path: str | Path, allow_pickle: bool = False) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(vae_path(path), use_safetensors=not allow_pickle)


def scratch_tokenizer(words: list[str], directory: Path, max_length: int) -> CLIPTokenizer:
    """A word-level CLIP tokenizer over `words` (every word one token), saved in the run directory.

    A run directory that already holds one (a resumed run) keeps it, so the token ids a
    checkpoint was trained with never change under it.
    """
    if (directory / "tokenizer_config.json").is_file():
        logger.info("Using the run's existing tokenizer in %s.", directory)
        return CLIPTokenizer.from_pretrained(directory)
    return build_clip_tokenizer(sorted(words), directory, model_max_length=max_length)


def scratch_text_encoder(config: dict, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A CLIPTextModel whose vocabulary and special tokens match the tokenizer."""
    config = {
        **config,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": tokenizer.model_max_length,
    }
    return CLIPTextModel(CLIPTextConfig(**config))


def scratch_unet(config: dict, text_hidden_size: int, latent_size: int, latent_channels: int) -> UNet2DConditionModel:
    cross = config.get("cross_attention_dim", text_hidden_size)
    if cross != text_hidden_size:
        raise ValueError(
            f"unet.json cross_attention_dim={cross} but the text encoder's hidden_size is {text_hidden_size}; "
            "make them equal (or leave cross_attention_dim out to use the text encoder's)."
        )
    config = {
        **config, "cross_attention_dim": text_hidden_size, "sample_size": latent_size,
        "in_channels": latent_channels, "out_channels": latent_channels,
    }
    return UNet2DConditionModel(**config)


def load_from_scratch(opts: ModelOptions, words: list[str], resolution: int, work_dir: Path, seed: int) -> Components:
    """New models from small configs in `opts.from_scratch` (seeded initialisation)."""
    folder = Path(opts.from_scratch)
    if not folder.is_dir():
        raise FileNotFoundError(f"--from_scratch {folder} is not a folder holding {', '.join(SCRATCH_FILES)}.")
    torch.manual_seed(seed)
    if opts.pretrained_vae:
        vae = load_vae(opts.pretrained_vae, opts.allow_pickle)
    else:
        vae = AutoencoderKL(**{**_read_json(folder / "vae.json"), "sample_size": resolution})
    if opts.train_vae:
        return Components(None, vae, None, None, {})
    te_config = _read_json(folder / "text_encoder.json")
    tokenizer = scratch_tokenizer(words, work_dir / "tokenizer", te_config.get("max_position_embeddings", 77))
    text_encoder = scratch_text_encoder(te_config, tokenizer)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = scratch_unet(
        _read_json(folder / "unet.json"), text_encoder.config.hidden_size, resolution // factor,
        vae.config.latent_channels,
    )
    scheduler_file = folder / "scheduler.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    return Components(unet, vae, text_encoder, tokenizer, {**DEFAULT_SCHEDULER_CONFIG, **scheduler_config})


def load_pretrained(opts: ModelOptions) -> Components:
    """Components of a local diffusers SD or SDXL folder or a single checkpoint file (ldm_pipeline's loader
    detects the family: safetensors only unless --allow_pickle; a single file needs --single_file_config,
    nothing is downloaded)."""
    from ldm_pipeline.loading import load_pipeline

    path = Path(opts.pretrained_model_name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {path} does not exist (no hub downloads here: give a local "
            "diffusers folder or .safetensors file, or use --from_scratch)."
        )
    config = {"config": opts.single_file_config} if path.is_file() and opts.single_file_config else {}
    pipe = load_pipeline(path, device="cpu", dtype=torch.float32, allow_pickle=opts.allow_pickle, **config)
    vae = load_vae(opts.pretrained_vae, opts.allow_pickle) if opts.pretrained_vae else pipe.vae
    sdxl = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2} if pipe.family == "sdxl" else {}
    if sdxl:
        from training.sdxl import check_fits

        check_fits(pipe.unet, pipe.text_encoder_2, str(path))
        logger.info("%s: fine-tuning a Stable Diffusion XL model (two text encoders, size conditioning).", path)
    return Components(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config), **sdxl)


# ---------------------------------------------------------------- the trained objective as a scheduler config


def resolve_objective(opts: ObjectiveOptions, base: dict) -> dict:
    """Scheduler-config keys of what will be trained: CLI overrides, else the model's config."""
    prediction_type = opts.prediction_type or base.get("prediction_type", "epsilon")
    beta_schedule = opts.noise_schedule or base.get("beta_schedule", "scaled_linear")
    zero_snr = opts.zero_terminal_snr or bool(base.get("rescale_betas_zero_snr", False))
    return {
        "prediction_type": prediction_type,
        "beta_schedule": BETA_SCHEDULE_NAMES.get(beta_schedule, beta_schedule),
        "beta_start": base.get("beta_start", 0.00085),
        "beta_end": base.get("beta_end", 0.012),
        "num_train_timesteps": base.get("num_train_timesteps", opts.num_train_timesteps),
        "rescale_betas_zero_snr": zero_snr and prediction_type != "flow",
        "shift": opts.flow_shift,
    }


def output_scheduler(objective: dict):
    """A sampler whose config matches the trained objective (and loads in stock diffusers)."""
    if objective["prediction_type"] == "flow":
        # Stock diffusers has no flow scheduler that runs in StableDiffusionPipeline (FlowMatchEuler lacks
        # init_noise_sigma/scale_model_input); ours does, and model_index.json names its module, so stock
        # `from_pretrained` loads it wherever this package is installed.
        from custom_schedulers import RectifiedFlowScheduler

        return RectifiedFlowScheduler(num_train_timesteps=objective["num_train_timesteps"], shift=objective["shift"])
    zero_snr = objective["rescale_betas_zero_snr"]
    return DPMSolverMultistepScheduler(
        num_train_timesteps=objective["num_train_timesteps"],
        beta_start=objective["beta_start"],
        beta_end=objective["beta_end"],
        beta_schedule=objective["beta_schedule"],
        prediction_type=objective["prediction_type"],
        rescale_betas_zero_snr=zero_snr,
        # Lin et al. 2023, Sec. 3.3: sample from the last (pure-noise) timestep.
        timestep_spacing="trailing" if zero_snr else "leading",
        steps_offset=1,  # used by "leading" only; 1 as in SD configs (diffusers warns otherwise)
        final_sigmas_type="zero" if zero_snr else "sigma_min",
    )


# ---------------------------------------------------------------- saving


def stock_pipeline(components: Components, scheduler):
    """The stock diffusers pipeline of the model's family (SD: no safety checker) over the components."""
    shared = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                  unet=components.unet, scheduler=scheduler)
    if components.family == "sdxl":
        return StableDiffusionXLPipeline(**shared, text_encoder_2=components.text_encoder_2,
                                         tokenizer_2=components.tokenizer_2, add_watermarker=False)
    return StableDiffusionPipeline(**shared, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_pipeline(directory: Path, components: Components, scheduler) -> Path:
    """A StableDiffusionPipeline (or StableDiffusionXLPipeline) folder in safetensors, written atomically."""
    pipe = stock_pipeline(components, scheduler)
    with atomic_directory(directory) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        name_package_of_our_scheduler(tmp / "model_index.json")
    return directory


def name_package_of_our_scheduler(model_index: Path) -> None:
    """["custom_schedulers.scheduling_x", "X"] -> ["custom_schedulers", "X"]: diffusers resolves a component
    by `getattr(library, "SchedulerMixin")`, which the package exports and the submodule does not."""
    index = json.loads(model_index.read_text())
    library, class_name = index["scheduler"]
    if library.startswith("custom_schedulers."):
        index["scheduler"] = ["custom_schedulers", class_name]
        model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_vae(directory: Path, vae: AutoencoderKL) -> Path:
    with atomic_directory(directory) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return directory
