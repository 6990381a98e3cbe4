"""Batch generation: `ldm-generate` and `python -m ldm_pipeline`.

    ldm-generate "a red circle on a blue background" --n 4 --out images/
    ldm-generate --prompts prompts.jsonl --model path/to/model --scheduler dpmpp-2m --steps 25
    accelerate launch --num_processes 2 -m ldm_pipeline --prompts prompts.txt --out images/
    ldm-generate "a red circle" --hires 2 --hires-steps 10 --hires-strength 0.5     # hires fix (`hires`)
    ldm-generate "a red circle" --xyz "Sampler: euler, ddim" --xyz "Steps: 10, 20"  # X/Y/Z plot (`xyz`)

Prompts: one on the command line, or a file: `.txt` (one prompt per line; blank lines and
lines starting with `#` are skipped) or `.jsonl` (one JSON object per line with `prompt`
and any of the per-line overrides in `LINE_KEYS`).

A line becomes a `GenerationOptions` (the pipeline's own record, `ldm_pipeline.options`,
which checks it with the same messages as the pipeline and the app) plus a sampler name;
`n` is its `num_images_per_prompt`.

Seeds: image k of prompt i (i = the prompt's 0-based line index in the file) gets seed
`base + 10000 * i + k`, or `seed + k` when the line gives its own seed (`options.line_seed`,
`options.image_seeds`). It is a pure function of (base seed, i, k), so results depend
neither on the batch size nor on the number of processes.

Outputs, in `--out`: `{i:05d}_{k:03d}.png` with the AUTOMATIC1111 `parameters` chunk and
the full JSON recipe (see `metadata`), and `manifest.jsonl`, one line per image, rebuilt
from the images at the end of every run. PNGs are written to a temporary name and
renamed. Rerunning skips every image whose file already holds the same request.

Bad lines (unknown key or scheduler, size not a multiple of 8, empty prompt, ...) are
reported with their line number and skipped; a failing image does not stop the others.
An output folder that cannot be written (a file, no permission, a full disk) stops the run
with one message; `manifest.jsonl` then still lists exactly the PNGs on disk (or is removed
when even it cannot be written), and no temporary file is left.
Exit code: 0 if everything was made, 1 if any line or image failed, 2 for bad arguments
or an unusable output folder, 130 when interrupted (Ctrl-C; rerun to resume).

Multi-process (`accelerate launch`): the full list of images is split between processes
with `PartialState.split_between_processes`; each process makes its share. On a machine
without CUDA, `accelerate launch --multi_gpu --num_processes 2 -m ldm_pipeline ...` (or
`torchrun --nproc_per_node 2 -m ldm_pipeline ...`) starts two CPU processes joined by
gloo; `accelerate launch --num_processes 2 --cpu` starts several processes only through
MPI (`mpirun` installed), and otherwise runs one process that makes every image.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from accelerate import PartialState

from ldm_pipeline import metadata
from ldm_pipeline.adapters import (
    LoraFile,
    activate_loras,
    load_embeddings,
    lora_hash,
    parse_lora_arg,
    pickle_free_kwargs,
    prompt_loras,
)
from ldm_pipeline.atomic import atomic_write_bytes
from ldm_pipeline.guidance import SCHEDULE_NAMES
from ldm_pipeline.guidance_methods import METHODS, sampler_problem
from ldm_pipeline.hires import UPSCALERS, HiresFix
from ldm_pipeline.loading import BACKENDS, ModelLoadError, load_pipeline
from ldm_pipeline.options import SEED_STRIDE, GenerationOptions, InvalidOptions, image_seeds, line_seed
from ldm_pipeline.perturbed_attention import DEFAULT_LAYERS
from ldm_pipeline.prompt_weights import EMPHASIS_MODES
from ldm_pipeline.served_adapters import ServedAdapters
from ldm_pipeline.service import GenerationService, ServiceRequest, prepare_schedulers
from ldm_pipeline.xyz import AXES, AxisError, XYZPlot, run_plot

if TYPE_CHECKING:
    from ldm_pipeline.sdxl import Refiner

logger = logging.getLogger("ldm_pipeline.generate")

# a prompt line's keys -> the GenerationOptions field each sets ("scheduler" and "n" are the CLI's own)
LINE_KEYS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "num_inference_steps",
    "guidance": "guidance_scale", "guidance_schedule": "guidance_schedule",
    "guidance_min_scale": "guidance_min_scale", "guidance_interval": "guidance_interval",
    "guidance_rescale": "guidance_rescale", "width": "width", "height": "height", "clip_skip": "clip_skip",
    "emphasis": "emphasis", "scheduler": None, "n": "num_images_per_prompt", "hires": "hires",
    # SDXL models only (sizes as [height, width], the crop as [top, left])
    "prompt_2": "prompt_2", "negative_prompt_2": "negative_prompt_2", "original_size": "original_size",
    "crops_coords_top_left": "crops_coords_top_left", "target_size": "target_size",
    **{key: key for key in ("guidance_method", "apg_eta", "apg_norm_threshold", "apg_momentum", "cfg_zero_init_steps",
                            "pag_scale", "pag_layers")},
}


class OutputError(OSError):
    """The output folder cannot be written (a file, no permission, a full disk); the message says which."""


@dataclass(frozen=True)
class Job:
    """One prompt line: its settings (seed = the line's first seed, num_images_per_prompt = n) and sampler."""

    index: int  # i: 0-based line index in the prompt file (0 for a command-line prompt)
    line: int  # 1-based line number (0 for a command-line prompt)
    options: GenerationOptions
    scheduler: str | None = None
    loras: tuple[LoraFile, ...] = ()  # --lora files, then the prompt's <lora:NAME:W> tags
    refiner: dict | None = None  # --refiner: its name, hash and switch (`sdxl.Refiner.describe`)


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
        settings = self.job.options.settings()
        settings.pop("num_images_per_prompt")
        loras = [[lora.name, lora_hash(lora.path), lora.scale] for lora in self.job.loras]  # never the server's paths
        refiner = {"refiner": self.job.refiner} if self.job.refiner else {}
        return {**settings, "scheduler": self.job.scheduler, "loras": loras, "index": self.job.index, "k": self.k,
                "seed": self.seed, **refiner}


# ---------------------------------------------------------------- reading prompts


@dataclass
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


def read_prompt_lines(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, prompt text or dict of overrides) for every non-blank, non-comment line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                         "save the prompt file as UTF-8.") from None
    for number, raw in enumerate(text.splitlines(), start=1):
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


def make_job(defaults: Job, base_seed: int, number: int, content) -> Job:
    """A job from a line: the command line's options with the line's keys on top (checked later)."""
    if isinstance(content, str):
        content = {"prompt": content}
    if not isinstance(content, dict):
        raise ValueError("a .jsonl line must be a JSON object with a `prompt`")
    unknown = sorted(set(content) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(LINE_KEYS)}")
    index = number - 1
    changes = {LINE_KEYS[k]: v for k, v in content.items() if LINE_KEYS[k]}
    changes.setdefault("seed", line_seed(base_seed, index))
    options = replace(defaults.options, **changes)
    return Job(index, number, options, content.get("scheduler", defaults.scheduler))


def check_job(job: Job, pipe, schedulers: dict) -> None:
    """Raise ValueError for a job that cannot run: the record's own check, the sampler, the CLI's n limit."""
    job.options.check(pipe.limits())
    n = job.options.num_images_per_prompt
    if n > SEED_STRIDE:
        raise ValueError(f"n must be between 1 and {SEED_STRIDE} (the seed stride between lines), got {n}")
    scheduler = schedulers.get(job.scheduler, pipe.scheduler)
    if isinstance(scheduler, Exception):
        raise ValueError(str(scheduler))
    if sampler_problem(job.options.guidance_method, scheduler):
        raise ValueError(sampler_problem(job.options.guidance_method, scheduler))


def load_jobs(args, defaults: Job) -> tuple[list[Job], list[LineError]]:
    if args.prompts is None:
        return [defaults], []
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
            jobs.append(make_job(defaults, args.seed, number, content))
        except (ValueError, TypeError) as error:
            errors.append(LineError(number, str(error)))
    if not jobs and not errors:
        raise ValueError(f"{path}: no prompts in the file (only blank lines or # comments).")
    return jobs, errors


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


def units_for(jobs: list[Job]) -> list[Unit]:
    return [Unit(job, k, seed) for job in jobs
            for k, seed in enumerate(image_seeds(job.options.seed, job.options.num_images_per_prompt))]


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


def generate_batch(pipe, schedulers: dict, batch: list[Unit], out: Path, allow_pickle: bool = False,
                   refiner: "Refiner | None" = None) -> None:
    job = batch[0].job
    activate_loras(pipe, list(job.loras), allow_pickle)
    scheduler = schedulers[job.scheduler]
    pipe.scheduler = type(scheduler).from_config(scheduler.config)  # fresh state for every batch
    options = replace(job.options, seed=[u.seed for u in batch], num_images_per_prompt=len(batch), progress_bar=False)
    result = pipe(**options.kwargs()) if refiner is None else refiner(pipe, options)
    for unit, image, recipe in zip(batch, result.images, result.recipes):
        recipe["batch"] = {"line": job.line, "index": job.index, "k": unit.k, "request": unit.request()}
        try:
            metadata.write_png(out / unit.filename, image, recipe)
        except OSError as error:
            raise OutputError(error.errno, f"cannot write {out / unit.filename}: {error.strerror or error}") from None


def run_share(pipe, schedulers, units: list[Unit], out: Path, batch_size: int, process: str,
              allow_pickle: bool = False, refiner: "Refiner | None" = None) -> int:
    """Make the images of this process' share; returns the number of failed images.

    A failing prompt does not stop the rest; an output folder that cannot take a file stops the share."""
    todo = [u for u in units if not is_done(out / u.filename, u)]
    print(f"process {process}: {len(units)} images in its share, {len(units) - len(todo)} already done",
          file=sys.stderr)
    failed = 0
    for batch in batches(todo, batch_size):
        try:
            generate_batch(pipe, schedulers, batch, out, allow_pickle, refiner)
        except OutputError as error:
            print(f"error: {error.strerror}; stopping (rerun to make the rest)", file=sys.stderr)
            return len(todo) - sum(is_done(out / u.filename, u) for u in todo)
        except Exception as error:  # one failing prompt must not stop the rest
            failed += len(batch)
            where = f"line {batch[0].job.line}" if batch[0].job.line else "prompt"
            print(f"{where}: generation failed: {type(error).__name__}: {error}", file=sys.stderr)
    return failed


def write_manifest(out: Path, units: list[Unit]) -> int:
    """manifest.jsonl from the images on disk (atomic); returns the number of images listed.

    When it cannot be written (a full disk), the old one is removed rather than left describing
    other files, and OutputError says so; a rerun rebuilds it from the PNGs."""
    lines = []
    for unit in units:
        path = out / unit.filename
        if is_done(path, unit):
            recipe = metadata.read_png(path).recipe
            lines.append(json.dumps({"file": unit.filename, **recipe["batch"], "seed": unit.seed, "recipe": recipe},
                                    sort_keys=True))
    try:
        atomic_write_bytes(out / "manifest.jsonl", "".join(line + "\n" for line in lines).encode("utf-8"))
    except OSError as error:
        (out / "manifest.jsonl").unlink(missing_ok=True)
        raise OutputError(error.errno, f"cannot write {out / 'manifest.jsonl'} ({error.strerror or error}); "
                                       "it was removed, rerun to rebuild it from the PNGs") from None
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
    p.add_argument("--prompt-2", default=None, metavar="TEXT",
                   help="SDXL only: the second text encoder's prompt (default: the prompt)")
    p.add_argument("--negative-2", default=None, metavar="TEXT",
                   help="SDXL only: the second text encoder's negative prompt (default: --negative)")
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
    add_guidance_method_arguments(p)
    p.add_argument("--scheduler", default=None, metavar="NAME", help="sampler name (default: the model's own)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; image k of prompt i gets seed + 10000*i + k (default %(default)s)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--clip-skip", type=int, default=None, help="1 = penultimate CLIP layer (diffusers convention)")
    p.add_argument("--emphasis", default="original", choices=EMPHASIS_MODES,
                   help="A1111 prompt emphasis (word:1.2) [word] BREAK: original (default), no_norm, or off (plain text)")
    # hires fix and X/Y/Z plot
    p.add_argument("--hires", type=float, default=None, metavar="FACTOR",
                   help="hires fix: generate at the size given, upscale by FACTOR, then an img2img pass")
    p.add_argument("--hires-steps", type=int, default=0, help="steps of the hires pass (default: the base steps)")
    p.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the hires pass "
                   "(default %(default)s)")
    p.add_argument("--hires-upscaler", default="Latent", metavar="NAME",
                   help=f"one of {', '.join(UPSCALERS)} (default %(default)s; also e.g. latent-nearest, lanczos)")
    p.add_argument("--xyz", action="append", default=[], metavar="'TYPE: VALUES'",
                   help="an X/Y/Z plot axis, repeatable: X, then Y, then Z (e.g. --xyz 'Sampler: euler, ddim' --xyz "
                        f"'Steps: 10-30 (+10)'); types: {', '.join(AXES)}; writes the images and one labelled grid")
    # model and run
    p.add_argument("--model", default=None, metavar="PATH", help="diffusers folder or .safetensors (default: embedded)")
    p.add_argument("--config", default=None, metavar="DIR", help="config folder for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt weights (can run code)")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="SDXL refiner folder taking over from the SDXL base at --refiner-switch-at")
    p.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="F",
                   help="fraction of the schedule the SDXL base runs before the refiner (default %(default)s)")
    p.add_argument("--lora", action="append", default=[], type=parse_lora_arg, metavar="PATH[:SCALE]",
                   help="a LoRA file (diffusers or kohya/A1111) and its weight (default 1); repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="the folder <lora:NAME:W> in a prompt is looked up in (only there)")
    p.add_argument("--embedding", action="append", default=[], type=Path, metavar="PATH",
                   help="a textual-inversion file; its file name is the token to use in prompts; repeatable")
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default %(default)s)")
    p.add_argument("--device", default=None, help="default: the accelerate process' device")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="weights dtype (default fp32)")
    p.add_argument("--xformers", action="store_true", help="xformers attention if installed and on CUDA")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    p.add_argument("--trace", action="store_true",
                   help="torch.jit.trace the UNet once per shape: faster steps for many images, ~2 s to trace")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="run the networks in PyTorch or ONNX Runtime (exported once per model); auto (default): "
                        "ONNX Runtime when installed, on the CPU, for the embedded model or one already exported, "
                        "without PyTorch-only options, else PyTorch")
    p.add_argument("--verbose", action="store_true", help="log progress")
    return p


def add_guidance_method_arguments(p: argparse.ArgumentParser) -> None:
    """--guidance-method and its parameters, --pag-scale / --pag-layers (see `ldm_pipeline.guidance_methods`)."""
    p.add_argument("--guidance-method", default="cfg", choices=METHODS,
                   help="how cond and uncond predictions combine: cfg, apg (Sadat et al. 2024), cfg++ (Chung et al. "
                        "2024; guidance 0-1, samplers ddim/ddpm/euler/euler-a/rf-euler), cfg-zero* (Fan et al. 2025)")
    p.add_argument("--apg-eta", type=float, default=None, help="APG: weight of the parallel part (default 0)")
    p.add_argument("--apg-norm-threshold", type=float, default=None,
                   help="APG: norm threshold r of the update (default 15; 0 = off)")
    p.add_argument("--apg-momentum", type=float, default=None, help="APG: momentum beta (default -0.5)")
    p.add_argument("--cfg-zero-init-steps", type=int, default=None,
                   help="CFG-Zero*: zero-initialised first steps (default 1)")
    p.add_argument("--pag-scale", type=float, default=0.0,
                   help="perturbed-attention guidance scale (Ahn et al. 2024; default 0 = off; ~3 typical)")
    p.add_argument("--pag-layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="LAYER",
                   help="UNet self-attention layers PAG perturbs, diffusers' names (default: mid)")


def guidance_method_options(args) -> dict:
    """The guidance-method options of the command line."""
    return {"guidance_method": args.guidance_method, "apg_eta": args.apg_eta,
            "apg_norm_threshold": args.apg_norm_threshold, "apg_momentum": args.apg_momentum,
            "cfg_zero_init_steps": args.cfg_zero_init_steps, "pag_scale": args.pag_scale,
            "pag_layers": args.pag_layers}


def default_job(args) -> Job:
    """The command line's settings; steps and guidance left out become the model's (`with_defaults`)."""
    options = GenerationOptions(
        prompt=args.prompt, negative_prompt=args.negative or None, num_inference_steps=args.steps,
        guidance_scale=args.guidance, guidance_schedule=args.guidance_schedule,
        guidance_min_scale=args.guidance_min_scale,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        guidance_rescale=args.guidance_rescale, width=args.width, height=args.height, seed=args.seed,
        num_images_per_prompt=args.n, clip_skip=args.clip_skip, emphasis=args.emphasis, prompt_2=args.prompt_2,
        hires=HiresFix(args.hires, args.hires_steps, args.hires_strength, args.hires_upscaler) if args.hires else None,
        negative_prompt_2=args.negative_2,
        **guidance_method_options(args),
    )
    return Job(index=0, line=0, options=options, scheduler=args.scheduler)


def with_loras(jobs: list[Job], errors: list[LineError], args) -> tuple[list[Job], list[LineError]]:
    """Each job with its LoRAs: --lora, then its prompt's <lora:NAME:W> tags (removed from the prompt)."""
    for lora in args.lora:
        if not lora.path.is_file():
            raise FileNotFoundError(f"--lora {lora.path}: no such file.")
        pickle_free_kwargs(lora.path, {}, args.allow_pickle)
    good = []
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if lora_dir is not None and not lora_dir.is_dir():
        raise FileNotFoundError(f"--lora-dir {lora_dir}: no such folder.")
    for job in jobs:
        try:
            if not isinstance(job.options.prompt, str):  # not text: the options check names the problem
                good.append(job)
                continue
            prompt, tagged = prompt_loras(job.options.prompt, lora_dir)
            for lora in tagged:
                pickle_free_kwargs(lora.path, {}, args.allow_pickle)
        except ValueError as error:
            errors.append(LineError(job.line, str(error)))
            continue
        good.append(replace(job, options=replace(job.options, prompt=prompt), loras=(*args.lora, *tagged)))
    return good, errors


def checked_jobs(jobs: list[Job], pipe, schedulers: dict) -> tuple[list[Job], list[LineError]]:
    good, errors = [], []
    for job in jobs:
        job = replace(job, options=job.options.with_defaults(pipe.recommended))
        try:
            check_job(job, pipe, schedulers)
            good.append(job)
        except ValueError as error:
            errors.append(LineError(job.line, str(error)))
    return good, errors


def prepare_output(out: Path) -> None:
    """Create the output folder and prove a file can be written there; OutputError says what is wrong."""
    if out.exists() and not out.is_dir():
        raise OutputError(errno.ENOTDIR, f"--out {out} is a file, not a folder: choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-", suffix=".tmp"):
            pass
    except OSError as error:
        raise OutputError(error.errno, f"cannot write to the output folder {out}: "
                                       f"{error.strerror or error}; choose another --out") from None
    remove_stale_temporaries(out)


def load_refiner(args, base, device) -> "Refiner":
    """--refiner: an SDXL refiner folder for an SDXL base, on the same device and dtype."""
    from ldm_pipeline.sdxl import Refiner  # diffusers' pipelines: only when a refiner is asked for

    return Refiner.load(args.refiner, base, args.refiner_switch_at, device=args.device or device, dtype=args.dtype,
                        allow_pickle=args.allow_pickle)


def resolve_backend(args, device) -> str:
    """`--backend auto`: the faster backend for this run (`onnx_backend.one_shot_backend`); others as given."""
    if args.backend != "auto":
        return args.backend
    from ldm_pipeline.onnx_backend import one_shot_backend

    pytorch_only = bool(args.lora or args.lora_dir or args.embedding or args.trace or args.xformers or args.vae_tiling)
    return one_shot_backend(args.model, device=device, dtype=args.dtype, pytorch_only=pytorch_only)


def use_cpu_processes() -> bool:
    """CPU processes: `accelerate launch --cpu`, or several processes on a machine without CUDA
    (PartialState only joins CPU processes into a gloo group when told so)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))))
    return forced or (world > 1 and not torch.cuda.is_available())


def parse_plot(parser, args) -> XYZPlot | None:
    """The --xyz axes, checked before the model loads (a bad axis exits 2 naming it)."""
    if args.hires is None and (args.hires_steps, args.hires_strength, args.hires_upscaler) != (0, 0.7, "Latent"):
        parser.error("--hires-steps, --hires-strength and --hires-upscaler need --hires FACTOR")
    if not args.xyz:
        return None
    if args.prompts is not None or args.n != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--xyz makes one grid of one prompt in one process: no --prompts, --n 1, no accelerate launch")
    if args.lora:
        parser.error("with --xyz, name LoRAs in the prompt as <lora:NAME:W> and give --lora-dir (not --lora PATH)")
    try:
        return XYZPlot.parse(args.xyz)
    except AxisError as error:
        parser.error(str(error))


def run_xyz(pipe, args, plot: XYZPlot, out: Path) -> int:
    """One X/Y/Z plot through a GenerationService writing into `out`: the cells' PNGs and the grid PNG. LoRAs
    are the prompt's <lora:NAME:W> tags, resolved per cell in --lora-dir (so Prompt S/R can change them)."""
    job = default_job(args)
    adapters = ServedAdapters(pipe, Path(args.lora_dir) if args.lora_dir else None, None, args.allow_pickle,
                              embeddings=list(pipe.embedding_records))  # the --embedding files, loaded
    service = GenerationService(pipe, out, prepare_schedulers(pipe, {job.scheduler, *plot.samplers()} - {None}),
                                adapters=adapters)

    def report(cell: int, cells: int, step: int, steps: int) -> None:
        if step == steps:
            print(f"cell {cell + 1} of {cells} done", file=sys.stderr)

    try:
        result = run_plot(service, ServiceRequest(job.options, sampler=job.scheduler), plot, on_progress=report)
    except InvalidOptions as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(result.cells)} images and the grid {result.grid} in {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("interrupted: the images already written are kept; rerun the same command to make the rest",
              file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give one prompt or --prompts FILE (not both)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.backend == "onnx" and (args.lora or args.embedding or args.lora_dir):
        parser.error("--lora, --lora-dir and --embedding need --backend pytorch (an exported ONNX model is fixed)")
    plot = parse_plot(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    state = PartialState(cpu=use_cpu_processes())
    out = Path(args.out)
    try:
        device = args.device or state.device
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype,
                             allow_pickle=args.allow_pickle, config=args.config, xformers=args.xformers,
                             vae_tiling=args.vae_tiling, trace=args.trace, backend=resolve_backend(args, device))
        load_embeddings(pipe, args.embedding, args.allow_pickle)
        jobs, errors = load_jobs(args, default_job(args))
        jobs, errors = with_loras(jobs, errors, args)
        refiner = load_refiner(args, pipe, state.device) if args.refiner else None
        jobs = [replace(job, refiner=refiner.describe()) for job in jobs] if refiner else jobs
        prepare_output(out)  # once the model loads (a refused run leaves no folder); every process, before any writes
    except (ModelLoadError, OutputError, FileNotFoundError, ValueError) as error:
        print(f"error: {error.strerror if isinstance(error, OutputError) else error}", file=sys.stderr)
        return 2
    if plot is not None:
        return run_xyz(pipe, args, plot, out)
    schedulers = prepare_schedulers(pipe, {job.scheduler for job in jobs if job.scheduler})
    jobs, bad = checked_jobs(jobs, pipe, schedulers)
    errors = sorted(errors + bad, key=lambda e: e.line)
    if state.is_main_process:
        for error in errors:
            print(f"skipped {error}", file=sys.stderr)
    state.wait_for_everyone()
    units = units_for(jobs)
    with state.split_between_processes(units) as share:
        failed = run_share(pipe, schedulers, share, out, args.batch_size, f"{state.process_index}/{state.num_processes}",
                           args.allow_pickle, refiner)
    state.wait_for_everyone()
    if state.is_main_process:
        try:
            made = write_manifest(out, units)
        except OutputError as error:
            print(f"error: {error.strerror}", file=sys.stderr)
            return 1
        print(f"{made} of {len(units)} images in {out} ({len(errors)} bad line(s))", file=sys.stderr)
        failed = max(failed, len(units) - made)
    return 1 if errors or failed else 0
