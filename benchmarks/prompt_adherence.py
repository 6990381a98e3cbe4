"""Prompt adherence of a text-to-image model on the `shapes` dataset, read by an independent judge.

    python benchmarks/prompt_adherence.py validate-judge --count 5000
    python benchmarks/prompt_adherence.py vae-roundtrip [--model DIR] [--count 1000]
    python benchmarks/prompt_adherence.py evaluate [--model DIR] [--per-split 32] \
        [--samplers ddim dpmpp-2m euler] [--steps 5 10 20 50] [--guidance 1 3 5 7.5] [--grids docs/]
    python benchmarks/prompt_adherence.py speed [--model DIR] [--repeats 10] [--python VENV/bin/python]

`validate-judge` reads generator images (whose attributes are known) and prints how often the
judge (`training.judge`: classical vision, no model) reads each attribute right. `vae-roundtrip`
judges generator images after the model's VAE encodes and decodes them: the ceiling the VAE
puts on every generated image. `evaluate`
generates images for canonical prompts of seen (training-split) and held-out combinations with
every (sampler, steps, guidance) cell and prints a Markdown table of per-attribute and
all-attributes-correct accuracy. Every cell uses the same prompts and seeds, so cells compare.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import judge, shapes  # noqa: E402
from training.data import to_pixels  # noqa: E402
from training.shapes import Attributes  # noqa: E402
from training.validation import to_pil  # noqa: E402

SPLITS = ("seen", "held_out")
PROMPT_SEED = 5  # which combinations are evaluated
IMAGE_SEED = 1234  # image k of a cell starts from the noise of seed IMAGE_SEED + k


def evaluation_combinations(per_split: int) -> dict[str, list[Attributes]]:
    """`per_split` distinct combinations of each split, drawn with a fixed seed (seen = training split)."""
    rng = random.Random(PROMPT_SEED)
    return {
        "seen": rng.sample(shapes.combinations("train"), per_split),
        "held_out": rng.sample(shapes.combinations("held_out"), per_split),
    }


# ---------------------------------------------------------------- judge validation


def validate_judge(count: int, seed: int = 2026) -> str:
    """Markdown table: the judge's accuracy on `count` generator images of each split."""
    rows = []
    for split in ("train", "held_out"):
        samples = shapes.generate(seed, count, split)
        result = judge.score((s.image, s.attributes) for s in samples)
        rows.append((split, result))
    return _table(["split"], [((split,), result) for split, result in rows])


@torch.no_grad()
def roundtrip_scores(vae, samples: list[shapes.Sample], batch_size: int = 200) -> judge.Scores:
    """The judge on generator samples after `vae` encodes (posterior mode) and decodes them."""
    pixels = to_pixels([s.image for s in samples])
    decoded = [vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in pixels.split(batch_size)]
    return judge.score(zip(to_pil(torch.cat(decoded)), (s.attributes for s in samples)))


def vae_roundtrip(model: str | None, count: int, seed: int = 11) -> str:
    """Markdown table: the judge on `count` training-split generator images after a VAE round trip."""
    scores = roundtrip_scores(load(model).vae, shapes.generate(seed, count, "train"))
    return _table(["images"], [(("VAE round trip",), scores)])


# ---------------------------------------------------------------- generation


def load(model: str | None, device: str = "cpu", trace: bool = False):
    """Our pipeline (`ldm_pipeline.load_pipeline`; the embedded default model when `model` is None)."""
    from ldm_pipeline import load_pipeline

    return load_pipeline(model, device=device, trace=trace)


def set_sampler(pipe, name: str) -> None:
    from ldm_pipeline import swap_scheduler

    swap_scheduler(pipe, name)


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, batch_size: int) -> list[Image.Image]:
    """One image per prompt; image k uses seed IMAGE_SEED + k whatever the batching."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance,
            seed=[IMAGE_SEED + start + k for k in range(len(chunk))],
            height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, output_type="pil", progress_bar=False,
        )
        images.extend(out.images)
    return images


@dataclass(frozen=True)
class Cell:
    sampler: str
    steps: int
    guidance: float


def evaluate(pipe, cells: list[Cell], combos: dict[str, list[Attributes]], batch_size: int, log=print):
    """{(split, cell): (Scores, images)} for every cell; prompts of both splits go in one batch."""
    prompts = [a.caption() for split in SPLITS for a in combos[split]]
    results = {}
    for cell in cells:
        started = time.perf_counter()
        set_sampler(pipe, cell.sampler)
        images = generate(pipe, prompts, cell.steps, cell.guidance, batch_size)
        offset = 0
        for split in SPLITS:
            part = images[offset : offset + len(combos[split])]
            offset += len(part)
            results[(split, cell)] = (judge.score(zip(part, combos[split])), part)
        seen, held = results[("seen", cell)][0], results[("held_out", cell)][0]
        log(
            f"{cell.sampler:>10} steps={cell.steps:<3} cfg={cell.guidance:<4} seen={seen.all_correct:.3f} "
            f"held_out={held.all_correct:.3f} ({time.perf_counter() - started:.1f}s)"
        )
    return results


# ---------------------------------------------------------------- reporting


def _table(keys: list[str], rows) -> str:
    header = [*keys, "n", *judge.ATTRIBUTES, "all correct"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, result in rows:
        values = [f"{result.per_attribute[a]:.1%}" for a in judge.ATTRIBUTES]
        lines.append("| " + " | ".join([*map(str, key), str(result.count), *values, f"**{result.all_correct:.1%}**"]) + " |")
    return "\n".join(lines)


def results_table(results) -> str:
    rows = [
        ((split, cell.sampler, cell.steps, cell.guidance), scores)
        for (split, cell), (scores, _) in sorted(
            results.items(), key=lambda kv: (SPLITS.index(kv[0][0]), kv[0][1].sampler, kv[0][1].steps, kv[0][1].guidance)
        )
    ]
    return _table(["split", "sampler", "steps", "guidance"], rows)


def best_cells(results, max_steps: int = 20) -> dict[str, tuple[Cell, judge.Scores]]:
    """Per split, the cell with the highest all-correct accuracy among those with <= max_steps."""
    best = {}
    for (split, cell), (scores, _) in results.items():
        if cell.steps <= max_steps and (split not in best or scores.all_correct > best[split][1].all_correct):
            best[split] = (cell, scores)
    return best


def grid(images: list[Image.Image], combos: list[Attributes], columns: int = 8, scale: int = 2) -> Image.Image:
    """Images in a grid, each framed green if the judge passes it, red if not."""
    size, border = shapes.IMAGE_SIZE * scale, 3
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (size + 2 * border), rows * (size + 2 * border)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (image, expected) in enumerate(zip(images, combos)):
        x, y = (k % columns) * (size + 2 * border), (k // columns) * (size + 2 * border)
        ok = all(judge.read_attributes(image).matches(expected).values())
        draw.rectangle((x, y, x + size + 2 * border - 1, y + size + 2 * border - 1), fill=(40, 170, 60) if ok else (210, 30, 30))
        canvas.paste(image.resize((size, size), Image.Resampling.NEAREST), (x + border, y + border))
    return canvas


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
    pipes = {"eager UNet": load(model), "traced UNet (`trace=True`)": load(model, trace=True)}
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
    pipe = load(args.model, trace=args.trace)
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
