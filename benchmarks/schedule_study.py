"""The noise schedule's effect: models trained alike except for the schedule, compared at equal NFE.

    # train (one thread each; docs/quality_study.md has the times), then compare:
    for s in scaled_linear cosine cosine_zero_snr scaled_linear_zero_snr; do
        OMP_NUM_THREADS=1 python -m training.train --config training/recipes/schedule_study/$s.yaml \\
            --output_dir /tmp/schedule_study/$s
    done
    python benchmarks/schedule_study.py /tmp/schedule_study/*/model [--steps 5 10 20] [--guidance 3] \\
        [--rescale 0] [--spacing own trailing] [--per-split 64] [--trace] [--plot docs/schedule_study.png]

Every model folder is sampled with the same sampler (default DPM-Solver++ 2M), steps, guidance and
guidance rescale, on the same prompts and seeds (`evaluation.quality.measure`). `--spacing own`
keeps the timestep spacing the trainer saved with the model (leading for the schedules that do not
reach zero SNR, as SD ships; trailing for zero-terminal-SNR ones, Lin et al. 2023 Sec. 3.3);
`trailing` samples every model from t = T-1, so a schedule's training and its sampling grid can be
told apart. The table is `benchmarks/quality_study.py`'s, with each model's terminal SNR (from its
scheduler config: SNR(T) = alpha-bar_T / (1 - alpha-bar_T)) and the trainer's deterministic
validation loss (`train_summary.json` beside the model; v-MSE at evenly spread timesteps, so it
depends on the schedule and compares models only loosely).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from quality_study import draw_quality, floor_row, row, save_figure, separator  # the script's own folder is on sys.path

from custom_schedulers.schedules import schedule_from_config
from evaluation.features import load_feature_net
from evaluation.judge import ATTRIBUTES
from evaluation.quality import Quality, measure, reference
from ldm_pipeline import load_pipeline, swap_scheduler

LABELS = ("model", "spacing", "terminal SNR", "val. loss", "steps", "guidance")
HEADER = ("| " + " | ".join(LABELS) + " | FID | IS | precision | recall | seen all | held-out all "
          "| seen all (strict) | held-out all (strict) | size (strict, both) |")


@dataclass(frozen=True)
class TrainedModel:
    """A model folder of the study: its name (the run directory's), schedule and validation loss."""

    path: Path
    name: str
    scheduler_config: dict
    validation_loss: float | None

    @property
    def terminal_snr(self) -> float:
        return float(schedule_from_config(self.scheduler_config).snr[-1])

    @property
    def own_spacing(self) -> str:
        return self.scheduler_config.get("timestep_spacing", "leading")


def trained_model(path: Path) -> TrainedModel:
    """Read a model folder (`<run>/model`, or any diffusers folder) without loading weights."""
    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no scheduler/scheduler_config.json: give the model/ folder of a run.")
    run = path.parent if path.name == "model" else path
    summary = run / "train_summary.json"
    loss = json.loads(summary.read_text()).get("final_validation_loss") if summary.is_file() else None
    return TrainedModel(path, run.name, json.loads(config_file.read_text()), loss)


def label(model: TrainedModel, spacing: str, steps: int, guidance: float) -> tuple:
    loss = "-" if model.validation_loss is None else f"{model.validation_loss:.4f}"
    return (model.name, spacing, f"{model.terminal_snr:.2g}", loss, steps, guidance)


def measure_model(model: TrainedModel, net, ref, args) -> list[tuple[tuple, Quality]]:
    """Every (spacing, steps) cell of one model; progress to stderr."""
    pipe = load_pipeline(model.path, trace=args.trace)
    spacings = dict.fromkeys(model.own_spacing if s == "own" else s for s in args.spacing)
    results = []
    for spacing in spacings:
        swap_scheduler(pipe, args.sampler, timestep_spacing=spacing)
        for steps in args.steps:
            started = time.perf_counter()
            quality = measure(pipe, net, ref, steps, args.guidance, args.batch_size, guidance_rescale=args.rescale)
            results.append((label(model, spacing, steps, args.guidance), quality))
            print(row(*results[-1]), f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    return results


def attribute_row(cell: tuple, quality: Quality) -> str:
    """Per-attribute accuracy, both splits pooled (threshold size reading, then strict)."""
    seen, held = quality.judged["seen"], quality.judged["held_out"]
    both = [(seen.per_attribute[a] + held.per_attribute[a]) / 2 for a in ATTRIBUTES]
    cells = [*map(str, (cell[0], cell[1], cell[4])), *(f"{v:.1%}" for v in both),
             f"{(seen.size_strict + held.size_strict) / 2:.1%}"]
    return "| " + " | ".join(cells) + " |"


def plot(models: list[TrainedModel], results, path: Path) -> None:
    """log-SNR(t) of each model's schedule (left); FID and strict all-correct against steps (middle, right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for model in models:
        log_snr = schedule_from_config(model.scheduler_config).log_snr.clamp(min=-25)
        axes[0].plot(log_snr.numpy(), label=f"{model.name} (SNR(T) = {model.terminal_snr:.2g})")
    axes[0].set(xlabel="training timestep t", ylabel="log SNR (clamped at -25)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    series = [((f"{cell[0]}, {cell[1]}", cell[4]), quality) for cell, quality in results]
    draw_quality(series, 1, 0, axes[1:], "steps (same sampler)", "", log_x=True)
    steps = sorted({cell[4] for cell, _ in results})
    for axis in axes[1:]:
        axis.set_xticks(steps, [str(s) for s in steps])
        axis.minorticks_off()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model folders (a run's model/), one per schedule")
    parser.add_argument("--sampler", default="dpmpp-2m")
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--rescale", type=float, default=0.0, help="guidance rescale, the same for every model")
    parser.add_argument("--spacing", nargs="+", default=["own", "trailing"], choices=["own", "leading", "trailing"])
    parser.add_argument("--per-split", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trace", action="store_true", help="trace the UNet (same images, faster on CPU)")
    parser.add_argument("--plot", type=Path, default=None, help="save the plot (PNG) here")
    args = parser.parse_args(argv)
    models = [trained_model(path) for path in args.models]
    net, ref = load_feature_net(), reference(args.per_split)
    with torch.no_grad():
        results = [result for model in models for result in measure_model(model, net, ref, args)]
    print(f"{args.per_split} prompts per split; sampler {args.sampler}, guidance {args.guidance}, "
          f"guidance rescale {args.rescale} for every model\n")
    print(HEADER)
    print(separator(HEADER))
    print(floor_row(net, ref, len(LABELS)))
    for cell, quality in results:
        print(row(cell, quality))
    attributes = "| model | spacing | steps | " + " | ".join(ATTRIBUTES) + " | size (strict) |"
    print(f"\nPer attribute, both splits pooled:\n\n{attributes}\n{separator(attributes)}")
    for cell, quality in results:
        print(attribute_row(cell, quality))
    if args.plot:
        plot(models, results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
