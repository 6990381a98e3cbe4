"""Cold start: the README's generate command against stock diffusers doing the same work, whole processes.
Prints Markdown tables (`docs/cold_start.md`).

    OMP_NUM_THREADS=1 python benchmarks/cold_start.py times --repeats 7    # wall, CPU, peak RSS; ratios vs stock
    OMP_NUM_THREADS=1 python benchmarks/cold_start.py importtime --repeats 5   # python -X importtime, by package

Commands (process start to exit, one 64x64 PNG of the embedded model, 10 steps, CFG 3, rescale 0.7, seed 0):

* stock: a script that loads the same folder with `StableDiffusionPipeline.from_pretrained` and saves
  the same image;
* the README command, `ldm-generate PROMPT --out DIR` (run as `python -m ldm_pipeline`), whose default
  `--backend auto` runs ONNX Runtime once the embedded model's export is in the cache;
* the same with `--backend pytorch` (eager diffusers networks);
* the README command on an empty export cache (a fresh `LDM_CACHE_DIR` every repeat): the first run,
  which exports the embedded model to ONNX before generating.

Every command runs once before timing (page cache, .pyc files, the export cache), then all run
interleaved in rotating order; a ratio is the median over repeats of (command / stock in the same
repeat), so both sides saw the same machine load. Peak RSS and CPU time (user + system) come from `wait4`.
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

STOCK = "stock diffusers script"
README = "README command (`ldm-generate PROMPT --out DIR`; auto: ONNX Runtime, export cached)"
PYTORCH = "README command `--backend pytorch`"
FIRST_RUN = "README command, first run (empty export cache: exports, then generates)"


def rotate(names: list[str], repeat: int) -> list[str]:
    k = repeat % len(names)
    return names[k:] + names[:k]


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    return statistics.median(t / r for t, r in zip(times[name], times[reference]))


def commands(out: str) -> dict[str, list[str]]:
    os.makedirs(out, exist_ok=True)
    ours = [sys.executable, "-m", "ldm_pipeline", PROMPT, "--out", out]
    return {STOCK: [sys.executable, "-c", STOCK_SCRIPT, str(DEFAULT_MODEL), PROMPT, out], README: ours,
            PYTORCH: ours + ["--backend", "pytorch"], FIRST_RUN: ours}


def run_process(command: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def run_all(repeats: int, tmp: str) -> tuple[dict, float]:
    """name -> {"wall", "cpu", "rss": [per repeat]}, and the size of the embedded model's export (MB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LDM_CACHE_DIR": tmp + "/cache"}
    runs = commands(tmp + "/out")
    for name, command in runs.items():  # warm-up; fills the shared export cache
        run_process(command, {**env, "LDM_CACHE_DIR": tmp + "/first-warm"} if name == FIRST_RUN else env)
    results = {name: defaultdict(list) for name in runs}
    for repeat in range(repeats):
        for name in rotate(list(runs), repeat):
            run_env = {**env, "LDM_CACHE_DIR": f"{tmp}/first-{repeat}"} if name == FIRST_RUN else env
            for key, value in zip(("wall", "cpu", "rss"), run_process(runs[name], run_env)):
                results[name][key].append(value)
    return results, folder_megabytes(Path(tmp) / "cache")


def times(repeats: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        results, export_mb = run_all(repeats, tmp)
    walls = {name: r["wall"] for name, r in results.items()}
    cpus = {name: r["cpu"] for name, r in results.items()}
    rows = [
        f"| {name} | {statistics.median(r['wall']):.2f} | {median_ratio(walls, name, STOCK):.2f} | "
        f"{statistics.median(r['cpu']):.2f} | {median_ratio(cpus, name, STOCK):.2f} | {statistics.median(r['rss']):.0f} |"
        for name, r in results.items()
    ]
    return "\n".join([
        f"Cold process, embedded model, one 64x64 image, 10 steps, CFG 3; {repeats} interleaved repeats, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f} "
        "at the end.", "",
        "| command | wall median (s) | wall ratio vs stock | CPU median (s) | CPU ratio vs stock | peak RSS median (MB) |",
        "|---|---|---|---|---|---|", *rows, "",
        f"The embedded model's ONNX export in the cache: {export_mb:.0f} MB.",
    ])


# ---------------------------------------------------------------- import time


PACKAGES = ("torch", "torch._dynamo", "torch._inductor", "sympy", "diffusers", "diffusers.models", "diffusers.pipelines",
            "diffusers.loaders", "transformers", "huggingface_hub", "accelerate", "bitsandbytes", "peft", "scipy",
            "onnxruntime", "tokenizers", "custom_schedulers", "ldm_pipeline", "training", "gradio", "matplotlib")


def import_times(command: list[str], env: dict) -> tuple[float, int, dict[str, float]]:
    """Total import time (s), the number of modules imported, and each package's time: the self time of its
    modules and subpackages, whoever imported them first."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], env=env, capture_output=True, text=True,
                            check=True)
    total, count, packages = 0.0, 0, dict.fromkeys(PACKAGES, 0.0)
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)$", line)
        if not match:
            continue
        own, name = int(match[1]) / 1e6, match[2]
        count += 1
        total += own
        for package in PACKAGES:
            if name == package or name.startswith(package + "."):
                packages[package] += own
    return total, count, packages


def importtime(repeats: int) -> str:
    """Medians over interleaved repeats (one `-X importtime` run is as noisy as one timing)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LDM_CACHE_DIR": tmp + "/cache"}
        runs = {name: command for name, command in commands(tmp + "/out").items() if name != FIRST_RUN}
        run_process(runs[README], env)  # fills the export cache
        measured = defaultdict(list)
        for repeat in range(repeats):
            for name in rotate(list(runs), repeat):
                measured[name].append(import_times(runs[name][1:], env))
    names = list(runs)

    def cell(name: str, pick) -> float:
        return statistics.median(pick(run) for run in measured[name])

    header = "| package (self time of its modules, s; median) | " + " | ".join(names) + " |"
    total = "| **all imports** | " + " | ".join(f"**{cell(n, lambda r: r[0]):.2f}**" for n in names) + " |"
    count = "| modules imported | " + " | ".join(f"{cell(n, lambda r: r[1]):.0f}" for n in names) + " |"
    rows = [f"| {p} | " + " | ".join(f"{cell(n, lambda r: r[2][p]):.2f}" for n in names) + " |" for p in PACKAGES]
    return "\n".join([f"{repeats} interleaved repeats, load average {os.getloadavg()[0]:.1f} at the end.", "",
                      header, "|---" * (len(names) + 1) + "|", total, count, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("times", "importtime"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(times(args.repeats) if args.what == "times" else importtime(args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
