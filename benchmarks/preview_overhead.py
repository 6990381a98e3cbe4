"""Live preview overhead: a generation with previews every 1, 5 and 10 steps vs none, cheap and full.

The embedded default model through `GenerationService` (the app's code path), PyTorch on the CPU,
one image of the model's native size, 30 steps. "cheap" = the fitted latent -> RGB map (fitted once
before timing; the app does it on first use), "full" = a VAE decode per preview. Variants interleaved
(rotating order), repeated; times are the process' CPU time with one torch thread (wall time is shown
too, noisy on a shared machine); "ratio" = median over repeats of (variant / no preview in the same
repeat); the issue's target is <= 1.10 for the cheap preview.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/preview_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_pipeline import GenerationOptions  # noqa: E402
from ldm_pipeline.service import GenerationService, ServiceRequest  # noqa: E402

VARIANTS = {"no preview": (None, "cheap"), **{f"{mode}, every {n} steps": (n, mode)
                                              for mode in ("cheap", "full") for n in (10, 5, 1)}}


def timed(service: GenerationService, request: ServiceRequest, variant: tuple) -> tuple[float, float]:
    shown = []
    every, mode = variant
    cpu, wall = time.process_time(), time.perf_counter()
    service.generate(request, on_preview=lambda *preview: shown.append(preview), preview_every=every,
                     preview_mode=mode)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as outputs:
        service = GenerationService.load(None, Path(outputs), device="cpu", backend="pytorch")
        request = ServiceRequest(GenerationOptions(prompt="a red circle", num_inference_steps=args.steps, seed=1),
                                 sampler="euler")
        service.previewer()
        timed(service, request, VARIANTS["no preview"])  # warm-up
        cpu = {name: [] for name in VARIANTS}
        wall = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                c, w = timed(service, request, VARIANTS[name])
                cpu[name].append(c)
                wall[name].append(w)
    print(f"Preview overhead, embedded model, {args.steps} steps, {args.repeats} repeats (CPU time, 1 thread)\n")
    print("| variant | median CPU s | median wall s | ratio to no preview |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        ratio = statistics.median(c / base for c, base in zip(cpu[name], cpu["no preview"]))
        print(f"| {name} | {statistics.median(cpu[name]):.3f} | {statistics.median(wall[name]):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
