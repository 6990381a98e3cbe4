"""Prompt adherence: generate images for fixed prompt sets and score them with the judge.

Seen prompts are combinations of the training split, held-out prompts combinations the
training split never yields. Every cell (sampler, steps, guidance) uses the same prompts and the
same seeds (image k starts from the noise of seed IMAGE_SEED + k), so cells compare.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from evaluation import judge
from training import shapes
from training.data import to_pixels
from training.shapes import Attributes
from training.validation import to_pil

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


@torch.no_grad()
def roundtrip_scores(vae, samples: list[shapes.Sample], batch_size: int = 200) -> judge.Scores:
    """The judge on generator samples after `vae` encodes (posterior mode) and decodes them."""
    pixels = to_pixels([s.image for s in samples])
    decoded = [vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in pixels.split(batch_size)]
    return judge.score(zip(to_pil(torch.cat(decoded)), (s.attributes for s in samples)))


@dataclass(frozen=True)
class Cell:
    """One generation setting: sampler name (`ldm_pipeline.swap_scheduler`), steps, guidance scale."""

    sampler: str
    steps: int
    guidance: float


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, batch_size: int,
             progress=None, **options) -> list[Image.Image]:
    """One 64x64 image per prompt; image k uses seed IMAGE_SEED + k whatever the batching.

    `options` go to the pipeline call (e.g. `guidance_rescale`); `progress` (a tqdm bar) is
    advanced by the number of images of each batch.
    """
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance,
            seed=[IMAGE_SEED + start + k for k in range(len(chunk))],
            height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, output_type="pil", progress_bar=False, **options,
        )
        images.extend(out.images)
        if progress is not None:
            progress.update(len(chunk))
    return images


def evaluate(pipe, cells: list[Cell], combos: dict[str, list[Attributes]], batch_size: int, log=print):
    """{(split, cell): (Scores, images)} for every cell; prompts of both splits go in one batch."""
    from ldm_pipeline import swap_scheduler

    prompts = [a.caption() for split in SPLITS for a in combos[split]]
    results = {}
    for cell in cells:
        started = time.perf_counter()
        swap_scheduler(pipe, cell.sampler)
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


def scores_table(keys: list[str], rows) -> str:
    """Markdown: one row per (key values, judge.Scores): per-attribute and all-correct accuracy, then strict size."""
    header = [*keys, "n", *judge.ATTRIBUTES, "all correct", "size (strict)", "all (strict)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, result in rows:
        values = [f"{result.per_attribute[a]:.1%}" for a in judge.ATTRIBUTES]
        strict = [f"{result.size_strict:.1%}", f"{result.all_correct_strict:.1%}"]
        lines.append("| " + " | ".join([*map(str, key), str(result.count), *values, f"**{result.all_correct:.1%}**", *strict]) + " |")
    return "\n".join(lines)


def results_table(results) -> str:
    """Markdown: the judge's table for every (split, cell) of `evaluate`'s results."""
    order = lambda kv: (SPLITS.index(kv[0][0]), kv[0][1].sampler, kv[0][1].steps, kv[0][1].guidance)
    rows = [
        ((split, cell.sampler, cell.steps, cell.guidance), scores)
        for (split, cell), (scores, _) in sorted(results.items(), key=order)
    ]
    return scores_table(["split", "sampler", "steps", "guidance"], rows)


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
