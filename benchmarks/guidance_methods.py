"""Guidance methods on the embedded model: prompt adherence (the shapes judge) and UNet evaluations per image.

Results: docs/guidance_methods.md.

Every cell uses the same prompts and seeds (`evaluation.adherence`), the Euler sampler (CFG++ takes a
single-step sampler) and the model's 10 steps; prints a Markdown table.

    python benchmarks/guidance_methods.py --per-split 64
"""

from __future__ import annotations

import argparse
import time

from evaluation import judge
from evaluation.adherence import SPLITS, evaluation_combinations, generate
from ldm_pipeline import load_pipeline, swap_scheduler

CELLS = [  # (label, guidance scale, pipeline options)
    ("cfg", 3.0, {}),
    ("cfg", 8.0, {}),
    ("apg (eta 0, r 15, beta -0.5)", 3.0, {"guidance_method": "apg"}),
    ("apg (eta 0, r 15, beta -0.5)", 8.0, {"guidance_method": "apg"}),
    ("apg (eta 0, r 15, beta 0)", 8.0, {"guidance_method": "apg", "apg_momentum": 0.0}),
    ("apg (eta 1, r 15, beta -0.5)", 8.0, {"guidance_method": "apg", "apg_eta": 1.0}),
    ("cfg-zero* (K 1)", 3.0, {"guidance_method": "cfg-zero*"}),
    ("cfg-zero* (K 1)", 8.0, {"guidance_method": "cfg-zero*"}),
    ("cfg++", 0.6, {"guidance_method": "cfg++"}),
    ("cfg++", 1.0, {"guidance_method": "cfg++"}),
    ("cfg + pag 3 (mid)", 3.0, {"pag_scale": 3.0}),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-split", type=int, default=64, help="prompts per split (seen, held out)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    pipe = load_pipeline()
    swap_scheduler(pipe, "euler")
    combos = evaluation_combinations(args.per_split)
    prompts = [a.caption() for split in SPLITS for a in combos[split]]
    print(f"{args.per_split} prompts per split, euler, {args.steps} steps\n")
    print("| method | w | seen all-correct | held-out all-correct | UNet evaluations / image | s |")
    print("|---|---|---|---|---|---|")
    for label, scale, options in CELLS:
        started = time.perf_counter()
        evaluations = pipe("a red circle", num_inference_steps=args.steps, guidance_scale=scale, seed=0,
                           output_type="latent", progress_bar=False, **options).unet_evaluations
        images = generate(pipe, prompts, args.steps, scale, args.batch_size, **options)
        seen = judge.score(zip(images[: args.per_split], combos["seen"])).all_correct
        held = judge.score(zip(images[args.per_split:], combos["held_out"])).all_correct
        print(f"| {label} | {scale:g} | {seen:.3f} | {held:.3f} | {evaluations} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
