"""Export a trained shapes model folder as the embedded default model (`ldm_pipeline/default_model/`).

    python training/recipes/shapes/export_default_model.py RUN_DIR/output [--dest ldm_pipeline/default_model]
        [--vae FINETUNED_VAE] [--sampler DPMSolverMultistepScheduler] [--steps 20] [--guidance 3.0] [--fp16]

Copies the StableDiffusionPipeline folder the training script wrote (safetensors), sets the
default sampler (the trained noise schedule and prediction type are kept), optionally stores the
weights in fp16, and writes `record.json` (parameter counts, stored dtypes, scheduler, the
recommended steps and guidance) that `tests/test_default_model.py` checks. Written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ldm_pipeline.atomic import atomic_directory  # noqa: E402
from ldm_pipeline.loading import DEFAULT_MODEL_DIR  # noqa: E402
from ldm_pipeline.scheduler_swap import MODEL_KEYS  # noqa: E402  (what the model was trained with)


def default_scheduler(trained_config: dict, sampler: str):
    """`sampler` (a diffusers class name) with the trained schedule; trailing spacing from the last step."""
    import diffusers

    cls = getattr(diffusers, sampler)
    model = {k: trained_config[k] for k in MODEL_KEYS if k in trained_config}
    # Zero terminal SNR: start sampling at the pure-noise step (Lin et al. 2023, Sec. 3.3).
    extra = {"timestep_spacing": "trailing"}
    if sampler == "DPMSolverMultistepScheduler":
        extra["final_sigmas_type"] = "zero"
    return cls.from_config({**model, **extra})


# diffusers upcasts fp16-stored UNet/VAE weights to the default fp32; transformers 5 keeps a
# CLIPTextModel in its stored dtype, so the (small) text encoder always stays fp32.
FP16_COMPONENTS = ("unet", "vae")


def record(pipe: StableDiffusionPipeline, steps: int, guidance: float) -> dict:
    def params(module):
        return sum(p.numel() for p in module.parameters())

    def stored(module):
        return "F16" if next(module.parameters()).dtype == torch.float16 else "F32"

    return {
        **{name: {"parameters": params(getattr(pipe, name)), "stored_dtype": stored(getattr(pipe, name))}
           for name in ("unet", "vae", "text_encoder")},
        "scheduler": {k: pipe.scheduler.config[k] for k in ("prediction_type", "timestep_spacing", "beta_schedule",
                                                             "rescale_betas_zero_snr")}
        | {"class": type(pipe.scheduler).__name__},
        "defaults": {"num_inference_steps": steps, "guidance_scale": guidance},
    }


def export(source: Path, dest: Path, sampler: str, steps: int, guidance: float, fp16: bool, vae: Path | None) -> dict:
    pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True, safety_checker=None)
    if vae is not None:  # the fine-tuned decoder (same encoder, same latent space and scaling factor)
        from diffusers import AutoencoderKL

        replacement = AutoencoderKL.from_pretrained(vae)
        if replacement.config.scaling_factor != pipe.vae.config.scaling_factor:
            raise ValueError(f"{vae} has scaling_factor {replacement.config.scaling_factor}, the model was trained "
                             f"with {pipe.vae.config.scaling_factor}: not the same latent space.")
        pipe.vae = replacement
    pipe.scheduler = default_scheduler(dict(pipe.scheduler.config), sampler)
    if fp16:
        for name in FP16_COMPONENTS:
            getattr(pipe, name).to(torch.float16)
    info = record(pipe, steps, guidance)
    with atomic_directory(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "record.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="The training run's pipeline folder (model_index.json inside).")
    parser.add_argument("--dest", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--sampler", default="DPMSolverMultistepScheduler", help="A diffusers scheduler class name.")
    parser.add_argument("--steps", type=int, default=20, help="Recommended sampler steps (recorded).")
    parser.add_argument("--guidance", type=float, default=3.0, help="Recommended guidance scale (recorded).")
    parser.add_argument("--vae", type=Path, default=None, help="A fine-tuned VAE folder (same encoder) to ship.")
    parser.add_argument("--fp16", action="store_true", help="Store UNet and VAE weights in fp16 (they load as fp32).")
    args = parser.parse_args(argv)
    if not (args.source / "model_index.json").is_file():
        parser.error(f"{args.source} has no model_index.json: pass the folder the training run wrote.")
    info = export(args.source, args.dest, args.sampler, args.steps, args.guidance, args.fp16, args.vae)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
