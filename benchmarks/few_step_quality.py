"""Few-step sampling on the embedded model: the judge's accuracy (and FID/IS) at 5 steps with our best few-step
sampler against DPM-Solver++ 2M at 10 steps.

    python benchmarks/few_step_quality.py [--per-split 32] [--guidance 3] [--trace]

Cells (each one image per prompt of the same prompts and seeds, `evaluation.quality.measure`):
DPM++ 2M at 10 and 5 steps (the model's own scheduler config), our `dpmpp-2m-pc` at 5 steps (DPM++ 2M with
the Adams-Moulton corrector, log-SNR-uniform levels down to sigma/alpha = 0.1, extrapolated final step: the
most accurate at NFE 5 on docs/sampler_accuracy.md with GITS levels), and 5-step cells on levels optimised for
this model by GITS (`custom_schedulers.optimised_levels`: 40 evaluations of the guided model on 4 prompts and
seeds of its own, not the evaluation's) with `dpmpp-2m-pc`, DPM++ 2M and UniPC. The pipeline has no custom-sigmas
option, so the GITS cell pins the scheduler's `set_timesteps` to those levels. Prints a Markdown table in the
format of `benchmarks/quality_study.py`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from quality_study import HEADER, floor_row, row, separator  # this folder (the script's own) is on sys.path

from custom_schedulers.optimised_levels import optimise_levels
from evaluation.features import load_feature_net
from evaluation.quality import measure, reference
from ldm_pipeline import load_pipeline, swap_scheduler
from ldm_pipeline.options import GenerationOptions

GITS_PROMPTS = ["a red circle on a blue background", "a small green square at the top left",
                "a large yellow triangle on a black background", "a blue circle at the bottom right"]


def guided_model(pipe, guidance_scale: float):
    """model(x, t): the pipeline's classifier-free-guided UNet output on GITS_PROMPTS (one prompt per sample)."""
    opts = GenerationOptions.from_kwargs(prompt=GITS_PROMPTS, guidance_scale=guidance_scale).with_defaults(
        pipe.recommended)
    embeds = pipe._embeddings(opts, GITS_PROMPTS, with_uncond=True)
    guidance = pipe._guidance(opts)

    def model(x: torch.Tensor, t) -> torch.Tensor:
        pair = pipe._predict(torch.cat([x, x]).to(pipe.unet.dtype), t, embeds.pair())
        return guidance.combine(*pair.chunk(2), guidance_scale).to(x.dtype)

    return model


def gits_levels(pipe, steps: int, guidance_scale: float) -> list[float]:
    latent = 64 // pipe.vae_scale_factor
    noise = torch.randn(len(GITS_PROMPTS), pipe.unet.config.in_channels, latent, latent,
                        generator=torch.Generator().manual_seed(2024), dtype=torch.float64)
    return optimise_levels(guided_model(pipe, guidance_scale), pipe.scheduler, steps, noise,
                           model_key=getattr(pipe, "model_hash", None))


def pin_levels(scheduler, levels: list[float]) -> None:
    """Make the pipeline's `set_timesteps(steps)` build the grid of `levels` (len(levels) steps)."""
    set_timesteps = scheduler.set_timesteps

    def pinned(num_inference_steps=None, device=None, **_):
        if num_inference_steps != len(levels):
            raise ValueError(f"these optimised levels are for {len(levels)} steps, not {num_inference_steps}.")
        set_timesteps(device=device, sigmas=levels)

    scheduler.set_timesteps = pinned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--per-split", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trace", action="store_true", help="trace the UNet (same images, faster on CPU)")
    args = parser.parse_args(argv)
    net, ref = load_feature_net(), reference(args.per_split)
    pipe = load_pipeline(args.model, trace=args.trace)
    cells = [("dpmpp-2m", 10, False), ("dpmpp-2m", 5, False), ("dpmpp-2m-pc", 5, False), ("dpmpp-2m-pc + GITS", 5, True),
             ("dpmpp-2m + GITS", 5, True), ("unipc", 5, False), ("unipc + GITS", 5, True)]
    results = []
    with torch.no_grad():
        for label, steps, optimised in cells:
            started = time.perf_counter()
            swap_scheduler(pipe, label.split()[0])
            if optimised:
                levels = gits_levels(pipe, steps, args.guidance)
                print(f"GITS levels (sigma/alpha): {[round(v, 3) for v in levels]}", file=sys.stderr)
                pin_levels(pipe.scheduler, levels)
            quality = measure(pipe, net, ref, steps, args.guidance, args.batch_size)
            results.append(((label, steps, args.guidance, "default"), quality))
            print(row(results[-1][0], quality), f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    print(f"{args.per_split} prompts per split, guidance {args.guidance}, the pipeline's default rescale\n")
    print(HEADER)
    print(separator(HEADER))
    print(floor_row(net, ref))
    for label, quality in results:
        print(row(label, quality))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
