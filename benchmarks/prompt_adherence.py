"""Prompt adherence of a text-to-image model on the `shapes` dataset, read by an independent judge.

    python benchmarks/prompt_adherence.py validate-judge --count 5000
    python benchmarks/prompt_adherence.py vae-roundtrip [--model DIR] [--count 1000]
    python benchmarks/prompt_adherence.py evaluate [--model DIR] [--per-split 32] \
        [--samplers ddim dpmpp-2m euler] [--steps 5 10 20 50] [--guidance 1 3 5 7.5] [--grids docs/]
    python benchmarks/prompt_adherence.py speed [--model DIR] [--repeats 10] [--python VENV/bin/python]

`validate-judge` reads generator images (whose attributes are known) and prints how often the
judge (`evaluation.judge`: classical vision, no model) reads each attribute right. `vae-roundtrip`
judges generator images after the model's VAE encodes and decodes them: the ceiling the VAE
puts on every generated image. `evaluate`
generates images for canonical prompts of seen (training-split) and held-out combinations with
every (sampler, steps, guidance) cell and prints a Markdown table of per-attribute and
all-attributes-correct accuracy. Every cell uses the same prompts and seeds, so cells compare.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import judge  # noqa: E402
from evaluation.adherence import (  # noqa: E402
    Cell,
    best_cells,
    evaluate,
    evaluation_combinations,
    grid,
    results_table,
    roundtrip_scores,
    scores_table,
)
from ldm_pipeline import load_pipeline  # noqa: E402
from training import shapes  # noqa: E402

# ---------------------------------------------------------------- judge validation


def validate_judge(count: int, seed: int = 2026) -> str:
    """Markdown table: the judge's accuracy on `count` generator images of each split."""
    rows = []
    for split in ("train", "held_out"):
        samples = shapes.generate(seed, count, split)
        rows.append(((split,), judge.score((s.image, s.attributes) for s in samples)))
    return scores_table(["split"], rows)


def vae_roundtrip(model: str | None, count: int, seed: int = 11) -> str:
    """Markdown table: the judge on `count` training-split generator images after a VAE round trip."""
    scores = roundtrip_scores(load_pipeline(model).vae, shapes.generate(seed, count, "train"))
    return scores_table(["images"], [(("VAE round trip",), scores)])


def save_grid(path: Path, images, combos) -> None:
    """Atomic write: temp file then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    grid(images, combos).save(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------- speed


def speed(model: str | None, repeats: int, steps: int = 20, guidance: float = 3.0, python: str | None = None) -> str:
    """Markdown: warm one-image latency, eager vs traced UNet (interleaved, medians), and the cold CLI time."""
    import statistics
    import subprocess
    import tempfile

    prompt = "a large red circle on a blue background at the top left"
    pipes = {"eager UNet": load_pipeline(model), "traced UNet (`trace=True`)": load_pipeline(model, trace=True)}
    call = lambda pipe, seed: pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                   height=64, width=64, progress_bar=False)
    for pipe in pipes.values():
        call(pipe, 0)  # warm-up (the traced pipeline traces its one shape here)
        call(pipe, 0)
    warm = {name: [] for name in pipes}
    for seed in range(repeats):  # interleaved, so both see the same machine load
        for name, pipe in pipes.items():
            started = time.perf_counter()
            call(pipe, seed)
            warm[name].append(time.perf_counter() - started)
    cold = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as out:
            command = [python or sys.executable, "-m", "ldm_pipeline", prompt, "--out", out]
            if model:
                command += ["--model", model]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cold.append(time.perf_counter() - started)
    eager, traced = (statistics.median(v) for v in warm.values())
    rows = [
        f"| one 64x64 image, {steps} steps, CFG {guidance}, warm, {name} | {statistics.median(times):.3f} s | "
        f"{len(times)} | " + " ".join(f"{t:.3f}" for t in times) + " |"
        for name, times in warm.items()
    ]
    return "\n".join([
        "| measurement | median | runs | all (s) |", "|---|---|---|---|", *rows,
        f"| `python -m ldm_pipeline PROMPT --out DIR`, cold process | {statistics.median(cold):.2f} s | {len(cold)} | "
        + " ".join(f"{t:.2f}" for t in cold) + " |",
        "", f"Traced / eager warm latency: {traced / eager:.2f} (torch threads: {torch.get_num_threads()}).",
    ])


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate-judge", help="Judge accuracy on generator images.")
    check.add_argument("--count", type=int, default=5000, help="Generator images per split.")
    roundtrip = commands.add_parser("vae-roundtrip", help="Judge accuracy on VAE reconstructions of generator images.")
    roundtrip.add_argument("--model", default=None, help="Model folder (default: the embedded default model).")
    roundtrip.add_argument("--count", type=int, default=1000)
    run = commands.add_parser("evaluate", help="Generate and judge; print the accuracy table.")
    run.add_argument("--model", default=None, help="Model folder (default: the embedded default model).")
    run.add_argument("--per-split", type=int, default=32, help="Prompts (distinct combinations) per split.")
    run.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp-2m", "euler"])
    run.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    run.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0, 5.0, 7.5])
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--grids", type=Path, default=None, help="Write sample grids (PNG) of the best cells here.")
    run.add_argument("--trace", action="store_true", help="Trace the UNet (same images, faster on CPU).")
    timing = commands.add_parser("speed", help="Warm latency of one image and cold-start CLI time.")
    timing.add_argument("--model", default=None)
    timing.add_argument("--repeats", type=int, default=10)
    timing.add_argument("--python", default=None,
                        help="Interpreter for the cold CLI run, e.g. a venv with only `pip install -e .` (the README's).")
    args = parser.parse_args(argv)

    if args.command == "speed":
        torch.set_grad_enabled(False)
        print(speed(args.model, args.repeats, python=args.python))
        return 0
    if args.command == "validate-judge":
        print(validate_judge(args.count))
        return 0
    if args.command == "vae-roundtrip":
        print(vae_roundtrip(args.model, args.count))
        return 0
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model, trace=args.trace)
    combos = evaluation_combinations(args.per_split)
    cells = [Cell(*c) for c in itertools.product(args.samplers, args.steps, args.guidance)]
    results = evaluate(pipe, cells, combos, args.batch_size, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(results_table(results))
    print()
    for split, (cell, scores) in best_cells(results).items():
        print(f"best <= 20 steps, {split}: {cell.sampler}, {cell.steps} steps, guidance {cell.guidance}: "
              f"all correct {scores.all_correct:.1%}")
        if args.grids:
            images = results[(split, cell)][1]
            save_grid(args.grids / f"prompt_adherence_{split}.png", images, combos[split])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
