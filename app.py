"""Gradio web UI for the ldm toolkit: layout and callbacks only.

Every image is made by `ldm_pipeline` (the same code path as the `ldm-generate`
batch CLI); this module only turns form fields into pipeline calls and results
into gallery entries.

    python app.py                       # embedded default model on http://127.0.0.1:7860
    python app.py --model PATH          # any SD folder or single .safetensors file
    python app.py --host 0.0.0.0 --port 8000 --share   # only when you mean it
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the server has no display; figures are rendered to images
import matplotlib.pyplot as plt  # noqa: E402

from custom_schedulers.schedules import alphas_cumprod_to_betas, named_schedules  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
ACCURACY_TABLE = REPO_DIR / "docs" / "sampler_accuracy.md"

# ---------------------------------------------------------------- input limits

MAX_SIDE = 2048  # pixels; larger images do not fit a typical GPU at SD scale
MAX_STEPS = 500
MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 64
MAX_SEED = 2**32 - 1


def validate_request(
    prompt: str, sampler: str, samplers: list[str], steps: int, width: int, height: int,
    batch_size: int, batch_count: int, seed: int,
) -> None:
    """Check a text-to-image request before the model runs; raise ValueError naming the problem and the fix."""
    problems = []
    if not prompt or not prompt.strip():
        problems.append("The prompt is empty: type what the image should show.")
    if sampler not in samplers:
        problems.append(f"Unknown sampler {sampler!r}: choose one of {', '.join(samplers)}.")
    if not (isinstance(steps, int) or float(steps).is_integer()) or not 1 <= steps <= MAX_STEPS:
        problems.append(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {steps}.")
    for name, side in (("Width", width), ("Height", height)):
        if side % 8 or not 8 <= side <= MAX_SIDE:
            problems.append(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {side}.")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        problems.append(f"Batch size must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}: "
                        "use batch count for more images.")
    if not 1 <= batch_count <= MAX_BATCH_COUNT:
        problems.append(f"Batch count must be from 1 to {MAX_BATCH_COUNT}, got {batch_count}.")
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        problems.append(f"Seed must be -1 (random) or from 0 to {MAX_SEED}, got {seed}.")
    if problems:
        raise ValueError(" ".join(problems))


# ---------------------------------------------------------------- schedules tab


def vp_equivalent_alpha_bar(schedule) -> "torch.Tensor":  # noqa: F821
    """alpha-bar of the VP schedule with the same SNR: snr / (1 + snr) (equals alpha^2 for VP schedules)."""
    s = schedule.snr
    return s / (1 + s)


def _curve_style(name: str, names: list[str]) -> dict:
    """One colour per base schedule; variants (zero-terminal SNR, shift) of it dashed."""
    def base(n: str) -> str:
        return re.split(r" \+|,| \(", n)[0]

    bases = list(dict.fromkeys(base(n) for n in names))
    variant = re.search(r" \+|,", name) is not None
    return {"color": f"C{bases.index(base(name))}", "linestyle": "--" if variant else "-"}


def schedule_figures(num_train_timesteps: int = 1000) -> dict[str, plt.Figure]:
    """log-SNR(t), alpha-bar(t) and beta(t) for every named schedule, one figure each.

    Rectified flow is not variance preserving; its alpha-bar and beta are those of the
    VP schedule with the same SNR, so every curve is comparable on the same axes.
    """
    schedules = named_schedules(num_train_timesteps)
    curves = {"log-SNR(t)": {}, "alpha-bar(t)": {}, "beta(t)": {}}
    for name, schedule in schedules.items():
        abar = vp_equivalent_alpha_bar(schedule)
        curves["log-SNR(t)"][name] = schedule.log_snr
        curves["alpha-bar(t)"][name] = abar
        curves["beta(t)"][name] = alphas_cumprod_to_betas(abar)
    t = [i / (num_train_timesteps - 1) for i in range(num_train_timesteps)]
    figures = {}
    for title, by_name in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        for name, values in by_name.items():
            ax.plot(t, values.numpy(), label=name, linewidth=1.4, **_curve_style(name, list(schedules)))
        ax.set_xlabel("t / T  (0 = clean, 1 = pure noise)")
        ax.set_title(title)
        if title == "beta(t)":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        figures[title] = fig
        plt.close(fig)
    return figures


def accuracy_table_markdown(path: Path = ACCURACY_TABLE) -> str:
    """The sampler accuracy table written by `benchmarks/sampler_accuracy.py`, or a note saying how to make it."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return (
        f"_No sampler accuracy table yet: `{path.relative_to(REPO_DIR)}` is missing. "
        "Run `python benchmarks/sampler_accuracy.py` to write it._"
    )


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldm-app", description="Gradio web UI for latent text-to-image diffusion.")
    parser.add_argument("--model", default=None,
                        help="SD diffusers folder or single .safetensors file (default: the embedded model). "
                             "Fixed at start-up; the browser cannot choose files.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the UI "
                             "to your network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"),
                        help="folder for the generated PNGs (default ./outputs)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="generations run at the same time; the rest wait in the queue (default 2)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="weights dtype (default: fp16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle checkpoints (.ckpt/.bin/.pt): only for files you trust")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    return args


if __name__ == "__main__":
    main()
