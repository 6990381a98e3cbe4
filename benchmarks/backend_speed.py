"""Backends on the CPU: the cold generate command against stock diffusers, and warm generation with the
eager, traced and ONNX Runtime networks. Prints Markdown tables.

    OMP_NUM_THREADS=1 python benchmarks/backend_speed.py cold --repeats 7       # whole processes, peak RSS
    OMP_NUM_THREADS=1 python benchmarks/backend_speed.py warm --repeats 10      # in-process, per image
    OMP_NUM_THREADS=1 python benchmarks/backend_speed.py importtime             # python -X importtime, by package

cold: the README command (`ldm-generate PROMPT --out DIR`, run as `python -m ldm_pipeline`) and its
`--trace` and `--backend onnx` variants against a stock script doing the same work
(`StableDiffusionPipeline.from_pretrained` on the same folder, same prompt, steps, guidance, size
and seed, saving one PNG). Process start to exit; peak RSS and CPU time from `wait4`.

warm: one pipeline per variant in one process, 10 steps with CFG at batch 1 and 8, on the embedded
model (64x64) and on a tiny SD-1.5-shaped model (SD 1.5's UNet block layout and 8x VAE, narrow
channels, random weights) at 256x256.

Every variant is warmed up first (this also fills the ONNX export cache and traces each shape),
then the variants run interleaved in rotating order; "ratio" is the median over repeats of
(variant / reference in the same repeat), so both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on a blue background at the top left"
DEFAULT_MODEL = REPO / "ldm_pipeline" / "default_model"

STOCK_SCRIPT = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
image = pipe(sys.argv[2], num_inference_steps=10, guidance_scale=3.0, guidance_rescale=0.7, height=64, width=64,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[3] + "/stock.png")
"""


def rotate(names: list[str], repeat: int) -> list[str]:
    k = repeat % len(names)
    return names[k:] + names[:k]


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    return statistics.median(t / r for t, r in zip(times[name], times[reference]))


# ---------------------------------------------------------------- cold processes


def cold_commands(out: str) -> dict[str, list[str]]:
    os.makedirs(out, exist_ok=True)
    ours = [sys.executable, "-m", "ldm_pipeline", PROMPT, "--out", out]
    return {
        "stock diffusers script": [sys.executable, "-c", STOCK_SCRIPT, str(DEFAULT_MODEL), PROMPT, out],
        "README command (`ldm-generate PROMPT --out DIR`)": ours,
        "README command `--trace`": ours + ["--trace"],
        "README command `--backend onnx` (export cached)": ours + ["--backend", "onnx"],
    }


def run_process(command: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def cold(repeats: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LDM_CACHE_DIR": tmp + "/cache"}
        commands = cold_commands(tmp + "/out")
        first_export = run_process(commands["README command `--backend onnx` (export cached)"], env)[0]
        for command in commands.values():
            run_process(command, env)  # warm-up: page cache, .pyc files
        results = {name: defaultdict(list) for name in commands}
        for repeat in range(repeats):
            for name in rotate(list(commands), repeat):
                for key, value in zip(("wall", "cpu", "rss"), run_process(commands[name], env)):
                    results[name][key].append(value)
    stock = "stock diffusers script"
    walls = {name: r["wall"] for name, r in results.items()}
    cpus = {name: r["cpu"] for name, r in results.items()}
    rows = [
        f"| {name} | {statistics.median(r['wall']):.2f} | {median_ratio(walls, name, stock):.2f} | "
        f"{statistics.median(r['cpu']):.2f} | {median_ratio(cpus, name, stock):.2f} | {max(r['rss']):.0f} |"
        for name, r in results.items()
    ]
    return "\n".join([
        f"Cold process, embedded model, one 64x64 image, 10 steps, CFG 3; {repeats} interleaved repeats, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
        f"{os.getloadavg()[0]:.1f} at the end.", "",
        "| command | wall median (s) | wall ratio vs stock | CPU median (s) | CPU ratio vs stock | peak RSS (MB) |",
        "|---|---|---|---|---|---|", *rows, "",
        f"First `--backend onnx` run (exports into the cache): {first_export:.1f} s.",
    ])


# ---------------------------------------------------------------- warm, in-process


def tiny_sd15_folder(folder: Path) -> Path:
    """SD 1.5's UNet block layout (4 levels, 2 layers each, cross-attention in the first 3) and 8x VAE,
    narrow channels, random weights, the repository's word-level CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO))
    from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=2, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1))
    scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    return folder


VARIANTS = {"eager": {}, "traced (`trace=True`)": {"trace": True}, "ONNX Runtime (`backend='onnx'`)": {"backend": "onnx"}}


def warm_case(model, size: int, batch: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """variant -> {"wall": [...], "cpu": [...]}, seconds per image."""
    from ldm_pipeline import load_pipeline

    pipes = {name: load_pipeline(model, **options) for name, options in VARIANTS.items()}

    def call(pipe, seed) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        pipe(PROMPT, num_inference_steps=10, guidance_scale=3.0, width=size, height=size, seed=seed,
             num_images_per_prompt=batch, progress_bar=False)
        return (time.perf_counter() - wall) / batch, (time.process_time() - cpu) / batch

    for pipe in pipes.values():
        call(pipe, 0), call(pipe, 0)
    times = {name: defaultdict(list) for name in pipes}
    for repeat in range(repeats):
        for name in rotate(list(pipes), repeat):
            wall, cpu = call(pipes[name], repeat)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def warm(repeats: int) -> str:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LDM_CACHE_DIR"] = tmp + "/cache"
        models = {"embedded": (None, 64), "tiny SD-1.5-shaped": (tiny_sd15_folder(Path(tmp) / "sd15"), 256)}
        for label, (model, size) in models.items():
            for batch in (1, 8):
                times = warm_case(model, size, batch, repeats)
                walls = {name: t["wall"] for name, t in times.items()}
                cpus = {name: t["cpu"] for name, t in times.items()}
                for name in VARIANTS:
                    rows.append(
                        f"| {label}, {size}x{size}, batch {batch} | {name} | {statistics.median(walls[name]):.3f} | "
                        f"{median_ratio(walls, name, 'eager'):.2f} | {statistics.median(cpus[name]):.3f} | "
                        f"{median_ratio(cpus, name, 'eager'):.2f} |")
                print(rows[-3:], file=sys.stderr, flush=True)
    return "\n".join([
        f"Warm, 10 steps with CFG (guidance 3), seconds per image, {repeats} interleaved repeats, torch "
        f"threads {torch.get_num_threads()} (ONNX Runtime intra-op threads the same), load average "
        f"{os.getloadavg()[0]:.1f} at the end.", "",
        "| case | networks | wall median | wall ratio vs eager | CPU median | CPU ratio vs eager |",
        "|---|---|---|---|---|---|", *rows,
    ])


# ---------------------------------------------------------------- import time


PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "peft", "onnxruntime",
            "custom_schedulers", "ldm_pipeline", "training", "gradio", "matplotlib", "scipy", "torch._dynamo")


def import_times(command: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """Total top-level import time and the cumulative time of each package in PACKAGES (s)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], env=env, capture_output=True, text=True,
                            check=True)
    total, packages = 0.0, {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if not match:
            continue
        cumulative, indent, name = int(match[1]) / 1e6, match[2], match[3]
        total += cumulative if len(indent) == 1 else 0.0
        if name in PACKAGES:
            packages[name] = max(packages.get(name, 0.0), cumulative)
    return total, packages


def importtime() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LDM_CACHE_DIR": tmp + "/cache"}
        commands = cold_commands(tmp + "/out")
        runs = {name: import_times(command[1:], env) for name, command in commands.items()}
    names = list(runs)
    header = "| package (cumulative s) | " + " | ".join(names) + " |"
    rows = [f"| {p} | " + " | ".join(f"{runs[n][1].get(p, 0):.2f}" for n in names) + " |" for p in PACKAGES]
    total = "| **all imports** | " + " | ".join(f"**{runs[n][0]:.2f}**" for n in names) + " |"
    return "\n".join([header, "|---" * (len(names) + 1) + "|", total, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("cold", "warm", "importtime"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print({"cold": lambda: cold(args.repeats), "warm": lambda: warm(args.repeats), "importtime": importtime}[args.what]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
