"""Batch generation: `ldm-generate` and `python -m ldm_pipeline`.

    ldm-generate "a red circle on a blue background" --n 4 --out images/
    ldm-generate --prompts prompts.jsonl --model path/to/model --scheduler dpmpp-2m --steps 25
    accelerate launch --num_processes 2 -m ldm_pipeline --prompts prompts.txt --out images/

Prompts: one on the command line, or a file: `.txt` (one prompt per line; blank lines and
lines starting with `#` are skipped) or `.jsonl` (one JSON object per line with `prompt`
and any of the per-line overrides in `LINE_KEYS`).

Seeds: image k of prompt i (i = the prompt's 0-based line index in the file) gets seed
`base + 10000 * i + k`, or `seed + k` when the line gives its own seed. It is a pure
function of (base seed, i, k), so results depend neither on the batch size nor on the
number of processes.

Outputs, in `--out`: `{i:05d}_{k:03d}.png` with the AUTOMATIC1111 `parameters` chunk and
the full JSON recipe (see `metadata`), and `manifest.jsonl`, one line per image, rebuilt
from the images at the end of every run. PNGs are written to a temporary name and
renamed. Rerunning skips every image whose file already holds the same request.

Bad lines (unknown key or scheduler, size not a multiple of 8, empty prompt, ...) are
reported with their line number and skipped; a failing image does not stop the others.
Exit code: 0 if everything was made, 1 if any line or image failed, 2 for bad arguments.

Multi-process (`accelerate launch`): the full list of images is split between processes
with `PartialState.split_between_processes`; each process makes its share. On a machine
without CUDA, `accelerate launch --multi_gpu --num_processes 2 -m ldm_pipeline ...` (or
`torchrun --nproc_per_node 2 -m ldm_pipeline ...`) starts two CPU processes joined by
gloo; `accelerate launch --num_processes 2 --cpu` starts several processes only through
MPI (`mpirun` installed), and otherwise runs one process that makes every image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from accelerate import PartialState

from ldm_pipeline import metadata
from ldm_pipeline.guidance import SCHEDULE_NAMES, as_interval
from ldm_pipeline.loading import BACKENDS, ModelLoadError, load_pipeline
from ldm_pipeline.scheduler_swap import SchedulerSwapError, swap_scheduler

logger = logging.getLogger("ldm_pipeline.generate")

SEED_STRIDE = 10_000  # images per prompt before seeds of neighbouring prompts meet
LINE_KEYS = {
    "prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": float,
    "guidance_schedule": str, "guidance_min_scale": float, "guidance_interval": object,
    "guidance_rescale": float, "width": int, "height": int, "scheduler": str, "n": int,
}


@dataclass(frozen=True)
class Job:
    """One prompt line with every setting resolved (command-line defaults + line overrides)."""

    index: int  # i: 0-based line index in the prompt file (0 for a command-line prompt)
    line: int  # 1-based line number (0 for a command-line prompt)
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None  # the line's own seed, else derived from the base seed
    steps: int = 30
    guidance: float = 7.5
    guidance_schedule: str = "constant"
    guidance_min_scale: float = 1.0
    guidance_interval: object = None
    guidance_rescale: float | None = None
    width: int = 512
    height: int = 512
    scheduler: str | None = None
    n: int = 1


@dataclass(frozen=True)
class Unit:
    """One image to make: image k of a job."""

    job: Job
    k: int
    seed: int

    @property
    def filename(self) -> str:
        return f"{self.job.index:05d}_{self.k:03d}.png"

    def request(self) -> dict:
        """What this image is: compared on resume to decide whether a file can be kept."""
        job = asdict(self.job)
        job.pop("n")
        return {**job, "k": self.k, "seed": self.seed, "guidance_interval": _interval_json(self.job.guidance_interval)}


def _interval_json(value):
    interval = as_interval(value)
    return interval.as_dict() if interval else None


def image_seed(base: int, index: int, k: int, own_seed: int | None) -> int:
    """Seed of image k of prompt `index`: a pure function of (base, index, k)."""
    return own_seed + k if own_seed is not None else base + SEED_STRIDE * index + k


# ---------------------------------------------------------------- reading prompts


@dataclass
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


def read_prompt_lines(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, prompt text or dict of overrides) for every non-blank, non-comment line."""
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                yield number, LineError(number, f"invalid JSON ({error.msg})")
        else:
            yield number, text


def make_job(defaults: Job, number: int, content) -> Job:
    """A job from a line (raises ValueError naming the problem)."""
    if isinstance(content, str):
        content = {"prompt": content}
    if not isinstance(content, dict):
        raise ValueError("a .jsonl line must be a JSON object with a `prompt`")
    unknown = sorted(set(content) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(LINE_KEYS)}")
    for key, kind in LINE_KEYS.items():
        if key in content and kind is not object and not isinstance(content[key], (kind, int) if kind is float else kind):
            raise ValueError(f"`{key}` must be {kind.__name__}, got {content[key]!r}")
    return replace(defaults, index=number - 1, line=number, **content)


def check_job(job: Job, size_multiple: int, schedulers: dict) -> None:
    """Raise ValueError for a job that cannot run."""
    if not job.prompt.strip():
        raise ValueError("empty prompt")
    if job.width % size_multiple or job.height % size_multiple or job.width <= 0 or job.height <= 0:
        raise ValueError(f"size {job.width}x{job.height} is not a positive multiple of {size_multiple}")
    if not 1 <= job.n <= SEED_STRIDE:
        raise ValueError(f"n must be between 1 and {SEED_STRIDE}, got {job.n}")
    if job.steps < 1:
        raise ValueError(f"steps must be >= 1, got {job.steps}")
    if job.guidance_schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown guidance_schedule {job.guidance_schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    as_interval(job.guidance_interval)
    if job.scheduler is not None and isinstance(schedulers.get(job.scheduler), Exception):
        raise ValueError(str(schedulers[job.scheduler]))


def load_jobs(args, defaults: Job) -> tuple[list[Job], list[LineError]]:
    if args.prompts is None:
        return [replace(defaults, prompt=args.prompt)], []
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found.")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: prompt files are .txt (one prompt per line) or .jsonl.")
    jobs, errors = [], []
    for number, content in read_prompt_lines(path):
        if isinstance(content, LineError):
            errors.append(content)
            continue
        try:
            jobs.append(make_job(defaults, number, content))
        except (ValueError, TypeError) as error:
            errors.append(LineError(number, str(error)))
    return jobs, errors


# ---------------------------------------------------------------- schedulers


def prepare_schedulers(pipe, names: set[str]) -> dict:
    """name -> checked scheduler (or the error that makes the name unusable for this model)."""
    base = pipe.scheduler
    prepared = {None: base}
    for name in sorted(names):
        try:
            swap_scheduler(pipe, name)
            prepared[name] = pipe.scheduler
        except SchedulerSwapError as error:
            prepared[name] = error
        finally:
            pipe.scheduler = base
    return prepared


# ---------------------------------------------------------------- generating


def is_done(path: Path, unit: Unit) -> bool:
    """The file exists, is a readable PNG and holds this exact request."""
    if not path.is_file():
        return False
    try:
        recipe = metadata.read_png(path).recipe
    except Exception:  # a damaged file is simply made again
        return False
    return bool(recipe) and (recipe.get("batch") or {}).get("request") == unit.request()


def units_for(jobs: list[Job], base_seed: int) -> list[Unit]:
    return [Unit(job, k, image_seed(base_seed, job.index, k, job.seed)) for job in jobs for k in range(job.n)]


def batches(units: list[Unit], batch_size: int) -> Iterator[list[Unit]]:
    """Consecutive units of the same job, at most batch_size at a time."""
    current: list[Unit] = []
    for unit in units:
        if current and (unit.job != current[0].job or len(current) == batch_size):
            yield current
            current = []
        current.append(unit)
    if current:
        yield current


def generate_batch(pipe, schedulers: dict, batch: list[Unit], out: Path, clip_skip: int | None) -> None:
    job = batch[0].job
    scheduler = schedulers[job.scheduler]
    pipe.scheduler = type(scheduler).from_config(scheduler.config)  # fresh state for every batch
    result = pipe(
        job.prompt, negative_prompt=job.negative_prompt or None, num_inference_steps=job.steps,
        guidance_scale=job.guidance, guidance_schedule=job.guidance_schedule, guidance_min_scale=job.guidance_min_scale,
        guidance_interval=job.guidance_interval, guidance_rescale=job.guidance_rescale, width=job.width,
        height=job.height, seed=[u.seed for u in batch], num_images_per_prompt=len(batch), clip_skip=clip_skip,
        progress_bar=False,
    )
    for unit, image, recipe in zip(batch, result.images, result.recipes):
        recipe["batch"] = {"line": job.line, "index": job.index, "k": unit.k, "request": unit.request()}
        metadata.write_png(out / unit.filename, image, recipe)


def run_share(pipe, schedulers, units: list[Unit], out: Path, args, process: str) -> int:
    """Make the images of this process' share; returns the number of failed images."""
    todo = [u for u in units if not is_done(out / u.filename, u)]
    print(f"process {process}: {len(units)} images in its share, {len(units) - len(todo)} already done",
          file=sys.stderr)
    failed = 0
    for batch in batches(todo, args.batch_size):
        try:
            generate_batch(pipe, schedulers, batch, out, args.clip_skip)
        except Exception as error:  # one failing prompt must not stop the rest
            failed += len(batch)
            where = f"line {batch[0].job.line}" if batch[0].job.line else "prompt"
            print(f"{where}: generation failed: {type(error).__name__}: {error}", file=sys.stderr)
    return failed


def write_manifest(out: Path, units: list[Unit]) -> int:
    """manifest.jsonl from the images on disk (atomic); returns the number of images listed."""
    lines = []
    for unit in units:
        path = out / unit.filename
        if is_done(path, unit):
            recipe = metadata.read_png(path).recipe
            lines.append(json.dumps({"file": unit.filename, **recipe["batch"], "seed": unit.seed, "recipe": recipe},
                                    sort_keys=True))
    tmp = out / ".manifest.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(out / "manifest.jsonl")
    return len(lines)


def remove_stale_temporaries(out: Path) -> None:
    """Temp files of an interrupted run (never a finished PNG)."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-generate", description="Generate images from prompts (see `python -m pydoc ldm_pipeline.generate`).",
        epilog="Run under `accelerate launch ... -m ldm_pipeline` to split the images between processes.",
    )
    p.add_argument("prompt", nargs="?", help="one prompt (or use --prompts)")
    p.add_argument("--prompts", metavar="FILE", help=".txt (one prompt per line) or .jsonl (per-line overrides: "
                   + ", ".join(LINE_KEYS) + ")")
    # what to generate
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's recommendation in its record.json, else 30)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (default: the model's recommendation, else 7.5)")
    p.add_argument("--guidance-schedule", default="constant", choices=SCHEDULE_NAMES, help="w as a function of t (default %(default)s)")
    p.add_argument("--guidance-min-scale", type=float, default=1.0, help="w at the far end of the ramps (default %(default)s)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only where SIGMA_LO < sigma <= SIGMA_HI (sigma = sigma_t/alpha_t)")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="guidance rescale phi (default: 0.7 for zero-terminal-SNR models, else 0)")
    p.add_argument("--scheduler", default=None, metavar="NAME", help="sampler name (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt i gets seed + 10000*i + k (default %(default)s)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--clip-skip", type=int, default=None, help="1 = penultimate CLIP layer (diffusers convention)")
    # model and run
    p.add_argument("--model", default=None, metavar="PATH", help="diffusers folder or .safetensors (default: embedded)")
    p.add_argument("--config", default=None, metavar="DIR", help="config folder for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt weights (can run code)")
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default %(default)s)")
    p.add_argument("--device", default=None, help="default: the accelerate process' device")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="weights dtype (default fp32)")
    p.add_argument("--xformers", action="store_true", help="xformers attention if installed and on CUDA")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    p.add_argument("--trace", action="store_true",
                   help="torch.jit.trace the UNet once per shape: faster steps for many images, ~2 s to trace")
    p.add_argument("--backend", default="pytorch", choices=BACKENDS,
                   help="run the networks in PyTorch or ONNX Runtime (exported once per model; default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="log progress")
    return p


def default_job(args, pipe) -> Job:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return Job(
        index=0, line=0, prompt=args.prompt or "", negative_prompt=args.negative,
        steps=args.steps if args.steps is not None else pipe.recommended.get("num_inference_steps", Job.steps),
        guidance=args.guidance if args.guidance is not None else pipe.recommended.get("guidance_scale", Job.guidance),
        guidance_schedule=args.guidance_schedule, guidance_min_scale=args.guidance_min_scale,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        guidance_rescale=args.guidance_rescale, width=args.width or native, height=args.height or native,
        scheduler=args.scheduler, n=args.n,
    )


def checked_jobs(jobs: list[Job], pipe, schedulers: dict) -> tuple[list[Job], list[LineError]]:
    good, errors = [], []
    for job in jobs:
        try:
            check_job(job, max(8, pipe.vae_scale_factor), schedulers)
            good.append(job)
        except ValueError as error:
            errors.append(LineError(job.line, str(error)))
    return good, errors


def use_cpu_processes() -> bool:
    """CPU processes: `accelerate launch --cpu`, or several processes on a machine without CUDA
    (PartialState only joins CPU processes into a gloo group when told so)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))))
    return forced or (world > 1 and not torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give one prompt or --prompts FILE (not both)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    state = PartialState(cpu=use_cpu_processes())
    try:
        pipe = load_pipeline(args.model, device=args.device or state.device, dtype=args.dtype,
                             allow_pickle=args.allow_pickle, config=args.config, xformers=args.xformers,
                             vae_tiling=args.vae_tiling, trace=args.trace, backend=args.backend)
        jobs, errors = load_jobs(args, default_job(args, pipe))
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    schedulers = prepare_schedulers(pipe, {job.scheduler for job in jobs if job.scheduler})
    jobs, bad = checked_jobs(jobs, pipe, schedulers)
    errors = sorted(errors + bad, key=lambda e: e.line)
    out = Path(args.out)
    if state.is_main_process:
        for error in errors:
            print(f"skipped {error}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    state.wait_for_everyone()
    units = units_for(jobs, args.seed)
    with state.split_between_processes(units) as share:
        failed = run_share(pipe, schedulers, share, out, args, f"{state.process_index}/{state.num_processes}")
    state.wait_for_everyone()
    if state.is_main_process:
        made = write_manifest(out, units)
        print(f"{made} of {len(units)} images in {out} ({len(errors)} bad line(s))", file=sys.stderr)
        failed = max(failed, len(units) - made)
    return 1 if errors or failed else 0
