"""`ldm-evaluate` / `python -m evaluation`: generate images for a prompt set and score them.

    ldm-evaluate [--model DIR] [--sampler NAME] [--steps N] [--guidance W] [--per-split 128]

Prompts: `--per-split` canonical captions of seen (training-split) and as many of held-out
combinations (`evaluation.adherence`). One image per prompt, image k from seed IMAGE_SEED + k.
The real reference set draws the same combinations with the dataset generator; a second,
independent real draw gives the noise floor: what FID, IS, precision and recall read for perfect
images at this number of images (`evaluation.quality`). Printed as Markdown: the distribution scores in the shapes
feature space (`evaluation.metrics`), optional stock scores (Inception FID from a local weights
file, CLIP score from a local CLIP folder), and the judge's per-attribute table per split.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from evaluation import metrics
from evaluation.adherence import scores_table
from evaluation.features import WEIGHTS, load_feature_net, to_uint8
from evaluation.quality import measure, reference
from training import shapes


def distribution_table(rows: dict[str, metrics.DistributionScores]) -> str:
    lines = ["| images | n | FID | IS | precision | recall |", "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s.count} | {s.fid:.3f} | {s.inception_score:.1f} | {s.precision:.3f} | {s.recall:.3f} |")
    return "\n".join(lines)


def settings(pipe, args) -> tuple[int, float, dict]:
    """Steps, guidance (the command line's, else the model's recommendation, else SD's 30 / 7.5) and
    the other pipeline options."""
    steps = args.steps if args.steps is not None else pipe.recommended.get("num_inference_steps", 30)
    guidance = args.guidance if args.guidance is not None else pipe.recommended.get("guidance_scale", 7.5)
    options = {"guidance_rescale": args.guidance_rescale}
    if args.guidance_interval:
        options["guidance_interval"] = tuple(args.guidance_interval)
    return steps, guidance, options


def stock_rows(args, real: torch.Tensor, fake: torch.Tensor, prompts: list[str]) -> list[str]:
    lines = []
    if args.inception_weights:
        lines.append(f"Inception FID (torchmetrics, 2048 features): {metrics.inception_fid(args.inception_weights, real, fake):.3f}")
    if args.clip:
        lines.append(f"CLIP score (prompt vs image): {metrics.clip_score(args.clip, fake, prompts):.2f}")
    return lines


def evaluate(args) -> str:
    from ldm_pipeline import load_pipeline, swap_scheduler

    net = load_feature_net(args.features)  # missing files fail here, before any generation
    if args.inception_weights:
        metrics.check_inception_weights(args.inception_weights)
    if args.clip:
        metrics.check_clip_folder(args.clip)
    pipe = load_pipeline(args.model, trace=args.trace)
    if args.sampler:
        swap_scheduler(pipe, args.sampler)
    steps, guidance, options = settings(pipe, args)
    ref = reference(args.per_split)
    with tqdm(total=len(ref.ordered), desc="generating", unit="img", file=sys.stderr) as bar:
        result = measure(pipe, net, ref, steps, guidance, args.batch_size, bar, **options)
    rows = {"generated": result.distribution, "real, independent draw (noise floor)": ref.noise_floor(net)}
    title = (f"## {args.model or 'embedded default model'}: {type(pipe.scheduler).__name__}, {steps} steps, "
             f"guidance {guidance}" + "".join(f", {k} {v}" for k, v in options.items() if v is not None))
    return "\n\n".join([
        title, distribution_table(rows),
        *stock_rows(args, ref.real, to_uint8(result.images), [a.caption() for a in ref.ordered]),
        scores_table(["split"], [((split,), s) for split, s in result.judged.items()]),
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, metavar="PATH", help="model folder (default: the embedded default model)")
    p.add_argument("--sampler", default=None, metavar="NAME", help="sampler name (default: the model's own)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommendation, else 30")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation, else 7.5")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="phi (default: 0.7 for zero-terminal-SNR models, else 0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only where SIGMA_LO < sigma <= SIGMA_HI")
    p.add_argument("--per-split", type=int, default=128, help="prompts of each split (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", default=str(WEIGHTS), metavar="FILE", help="shapes feature network (safetensors)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth) for the stock FID")
    p.add_argument("--clip", default=None, metavar="DIR", help="local CLIP folder (transformers) for the CLIP score")
    p.add_argument("--trace", action="store_true", help="trace the UNet (same images, faster on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    most = len(shapes.combinations("held_out"))
    if not 4 <= args.per_split <= most:
        raise SystemExit(f"ldm-evaluate: --per-split must be 4..{most} (precision/recall use 3 nearest neighbours; "
                         f"there are {most} held-out combinations), got {args.per_split}.")
    try:
        with torch.no_grad():  # a context, not set_grad_enabled: main() also runs inside other programs and tests
            print(evaluate(args))
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise SystemExit(f"ldm-evaluate: {error}") from error
    return 0
