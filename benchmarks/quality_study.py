"""Quality against steps (per sampler) and against guidance: FID, IS, precision/recall and the judge.

    python benchmarks/quality_study.py steps [--samplers ddim dpmpp-2m euler] [--steps 1 2 5 10 20] \
        [--guidance 3] [--per-split 64] [--plot docs/quality_vs_steps.png]
    python benchmarks/quality_study.py guidance [--sampler dpmpp-2m] [--steps 10] [--guidance 1 2 3 5 7.5] \
        [--rescale 0 0.7] [--interval SIGMA_LO SIGMA_HI] [--plot docs/quality_vs_guidance.png]

Every cell generates one image per prompt of the same prompt set with the same seeds
(`evaluation.quality`) on a model (default: the embedded one) and prints one Markdown row: FID,
IS, precision and recall in the shapes feature space against real images of the same
combinations, and the judge's all-attributes-correct accuracy per split (threshold and strict size
reading). The first line is the noise floor: a second real draw scored the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from evaluation.features import load_feature_net
from evaluation.quality import Quality, measure, reference
from ldm_pipeline import load_pipeline, swap_scheduler

HEADER = ("| sampler | steps | guidance | rescale | FID | IS | precision | recall | seen all | held-out all "
          "| seen all (strict) | held-out all (strict) | size (strict, both) |")


def row(label: tuple, q: Quality) -> str:
    d, seen, held = q.distribution, q.judged["seen"], q.judged["held_out"]
    size = (seen.size_strict + held.size_strict) / 2
    cells = [*map(str, label), f"{d.fid:.3f}", f"{d.inception_score:.1f}", f"{d.precision:.3f}", f"{d.recall:.3f}",
             f"{seen.all_correct:.1%}", f"{held.all_correct:.1%}", f"{seen.all_correct_strict:.1%}",
             f"{held.all_correct_strict:.1%}", f"{size:.1%}"]
    return "| " + " | ".join(cells) + " |"


def separator(header: str) -> str:
    """The Markdown line under `header`."""
    return "|" + "---|" * (header.count(" | ") + 1)


def floor_row(net, ref, label_columns: int = 4) -> str:
    """The noise floor's row: the label in the first of `label_columns` cells, the judge's five cells empty."""
    d = ref.noise_floor(net)
    return (f"| real (noise floor) |{' |' * (label_columns - 1)} {d.fid:.3f} | {d.inception_score:.1f} | "
            f"{d.precision:.3f} | {d.recall:.3f} | | | | | |")


def run_cells(pipe, net, ref, cells, batch_size: int, options: dict) -> list[tuple[tuple, Quality]]:
    """cells: (sampler, steps, guidance, rescale); logs progress to stderr."""
    results = []
    for sampler, steps, guidance, rescale in cells:
        started = time.perf_counter()
        swap_scheduler(pipe, sampler)
        quality = measure(pipe, net, ref, steps, guidance, batch_size, guidance_rescale=rescale, **options)
        results.append(((sampler, steps, guidance, rescale), quality))
        print(row((sampler, steps, guidance, rescale), quality), f"({time.perf_counter() - started:.0f}s)",
              file=sys.stderr, flush=True)
    return results


def plot(results, x_index: int, series_index: int, path: Path, xlabel: str, series_name: str, log_x: bool) -> None:
    """FID (left) and judge all-correct, both splits, strict size (right) against cell value `x_index`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    draw_quality(results, x_index, series_index, (left, right), xlabel, series_name, log_x)
    save_figure(figure, path)


def draw_quality(results, x_index: int, series_index: int, axes, xlabel: str, series_name: str, log_x: bool) -> None:
    """On two axes: FID, and the judge's all-correct (both splits, strict size), one line per series."""
    left, right = axes
    for series in dict.fromkeys(label[series_index] for label, _ in results):
        points = [(label[x_index], q) for label, q in results if label[series_index] == series]
        xs = [x for x, _ in points]
        left.plot(xs, [q.distribution.fid for _, q in points], marker="o", label=f"{series_name}{series}")
        strict = [(q.judged["seen"].all_correct_strict + q.judged["held_out"].all_correct_strict) / 2 for _, q in points]
        right.plot(xs, strict, marker="o", label=f"{series_name}{series}")
    for axis, ylabel in ((left, "FID (shapes features)"), (right, "judge: all correct, strict size")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if log_x:
            axis.set_xscale("log")
    left.set_yscale("log")
    right.legend()


def save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="study", required=True)
    steps = commands.add_parser("steps", help="Quality against step count, per sampler.")
    steps.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp-2m", "euler"])
    steps.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5, 10, 20])
    steps.add_argument("--guidance", type=float, default=3.0)
    guidance = commands.add_parser("guidance", help="Quality against guidance scale (and rescale).")
    guidance.add_argument("--sampler", default="dpmpp-2m")
    guidance.add_argument("--steps", type=int, default=10)
    guidance.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0, 7.5])
    guidance.add_argument("--rescale", nargs="+", type=float, default=[0.7])
    guidance.add_argument("--interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"))
    for command in (steps, guidance):
        command.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
        command.add_argument("--per-split", type=int, default=64)
        command.add_argument("--batch-size", type=int, default=64)
        command.add_argument("--trace", action="store_true", help="trace the UNet (same images, faster on CPU)")
        command.add_argument("--plot", type=Path, default=None, help="save the plot (PNG) here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    net, ref = load_feature_net(), reference(args.per_split)
    pipe = load_pipeline(args.model, trace=args.trace)
    if args.study == "steps":
        cells = [(s, n, args.guidance, None) for s in args.samplers for n in args.steps]
        options, x, series, xlabel, name = {}, 1, 0, "steps", ""
    else:
        cells = [(args.sampler, args.steps, g, r) for r in args.rescale for g in args.guidance]
        options = {"guidance_interval": tuple(args.interval)} if args.interval else {}
        x, series, xlabel, name = 2, 3, "guidance scale", "rescale "
    results = run_cells(pipe, net, ref, cells, args.batch_size, options)
    print(f"{args.per_split} prompts per split; {', '.join(f'{k} {v}' for k, v in options.items()) or 'no interval'}; "
          "rescale None = the pipeline's default (0.7 for zero-terminal-SNR models)\n")
    print(HEADER)
    print(separator(HEADER))
    print(floor_row(net, ref))
    for label, quality in results:
        print(row(label, quality))
    if args.plot:
        plot(results, x, series, args.plot, xlabel, name, log_x=args.study == "steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
