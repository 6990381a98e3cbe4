"""Optimised noise levels: the K sampling levels that minimise the local truncation error, found from a few
model evaluations (no data), cached per model.

    levels = optimise_levels(model, scheduler, num_steps=5, noise=torch.randn(4, 4, 64, 64), model_key=pipe.model_hash)
    scheduler.set_timesteps(sigmas=levels)          # or a stock pipeline's pipe(..., sigmas=levels)

The method is GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", Sec. 4):
1. a teacher trajectory from `noise` on a fine grid of candidate levels (log-SNR uniform, `fine_steps` model
   evaluations, DPM-Solver++ 3M), keeping the sample x_i and the model's x_0 estimate at every candidate;
2. the cost of a step i -> j is the RMS distance between a first-order (DDIM) step from the teacher's x_i with
   its own x_0 estimate and the teacher's x_j: the local truncation error, for all i < j at no further cost;
3. dynamic programming picks the K steps from the start level to sigma = 0 with the least total cost
   (the optimisation of Xue et al. 2024, "Accelerating Diffusion Sampling with Optimized Time Steps", solved
   exactly on the candidate grid).

`model(x, timestep)` returns the network output (the scheduler's `prediction_type`) at the sample x in the
scheduler's coordinates and a model timestep; bind the prompt and guidance in it for a text-to-image model.
Results are cached in a small JSON file in the user cache directory (`$LDM_CACHE_DIR/optimised_levels.json`,
default `~/.cache/ldm-toolkit/`), keyed by `model_key` (e.g. the model's hash), the noise schedule, the
candidate grid, the step count and the noise; without a `model_key` nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import grids, parameterization, solvers
from .schedules import SCHEDULE_KEYS, shift_sigmas

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CACHE_VERSION = 1


def optimise_levels(
    model: Model, scheduler, num_steps: int, noise: torch.Tensor, *, fine_steps: int | None = None,
    sigma_min: float | None = None, model_key: str | None = None, cache_path: Path | None = None,
) -> list[float]:
    """The `num_steps` evaluation levels (native: sigma/alpha for VP, s for flow; noisiest first) for
    `scheduler.set_timesteps(sigmas=...)` (with a "flow-match" `sigma_schedule`, which shifts custom sigmas as
    diffusers' FlowMatch schedulers do, they come unshifted: set_timesteps lands on the optimised ones), chosen from `fine_steps` candidates between the schedule's start level and
    `sigma_min` (default: the scheduler's `sigma_min`, else the training grid's smallest level); `fine_steps` (the
    teacher's model evaluations) defaults to max(40, 2 num_steps)."""
    if not hasattr(scheduler, "schedule"):
        raise TypeError(f"optimise_levels needs one of our samplers (`registry.build(name, config)`), got "
                        f"{type(scheduler).__name__}; the levels it returns also suit diffusers' schedulers' `sigmas=`.")
    fine_steps = fine_steps or max(40, 2 * num_steps)
    if not isinstance(num_steps, int) or not 1 <= num_steps <= fine_steps:
        raise ValueError(f"num_steps must be an integer from 1 to fine_steps ({fine_steps}), got {num_steps!r}.")
    sigma_min = sigma_min if sigma_min is not None else scheduler.config.sigma_min
    key = _cache_key(scheduler.config, num_steps, noise, fine_steps, sigma_min, model_key)
    path = cache_path or default_cache_path()
    cached = _read_cache(path).get(key) if model_key is not None else None
    if cached is not None:
        return [float(v) for v in cached]  # "inf" (zero terminal SNR's start) is stored as a string
    grid = grids.build_grid(scheduler.schedule, fine_steps, sigma_schedule="exponential", sigma_min=sigma_min)
    samples, denoised = teacher_trajectory(model, scheduler, grid, noise)
    nodes = best_path(step_costs(grid, samples, denoised), num_steps)
    levels = grids.grid_levels(grid, scheduler.schedule.kind)[nodes]
    if scheduler.config.sigma_schedule.startswith("flow-match"):  # set_timesteps shifts custom sigmas: undo it
        levels = shift_sigmas(levels, 1.0 / scheduler.config.shift).clamp(max=1.0)  # s = 1 stays 1 (rounding)
    levels = levels.tolist()
    if model_key is not None:
        _write_cache(path, {**_read_cache(path), key: [v if math.isfinite(v) else "inf" for v in levels]})
    return levels


def teacher_trajectory(model: Model, scheduler, grid: grids.SamplingGrid, noise: torch.Tensor):
    """(x at every node of `grid` and at sigma = 0, the x_0 estimate at every evaluation node) along DPM-Solver++ 3M
    from `noise` (float64)."""
    from .scheduling_dpmpp import DPMSolverPlusPlusSampler

    accepted = DPMSolverPlusPlusSampler._get_init_keys(DPMSolverPlusPlusSampler)
    config = {key: value for key, value in scheduler.config.items() if key in accepted}
    teacher = DPMSolverPlusPlusSampler.from_config(
        {**config, "sigma_schedule": "default"}, solver_order=3, final_step="extrapolate", corrector="none")
    levels = grids.grid_levels(grid, scheduler.schedule.kind)
    teacher.set_timesteps(sigmas=levels.tolist())
    x, samples, denoised = noise.to(torch.float64), [], []
    with torch.no_grad():
        for i, t in enumerate(teacher.timesteps):
            samples.append(x)
            output = teacher.step(model(x, t).to(torch.float64), t, x)
            x = output.prev_sample
            denoised.append(output.pred_original_sample)
    return samples + [x], denoised


def step_costs(grid: grids.SamplingGrid, samples: list[torch.Tensor], denoised: list[torch.Tensor]) -> torch.Tensor:
    """cost[i, j] (i < j <= N, N the sigma = 0 node): RMS distance between the DDIM step i -> j from the teacher's
    x_i with its x_0 estimate and the teacher's x_j (GITS's cost matrix); inf elsewhere."""
    n = grid.num_steps
    cost = torch.full((n + 1, n + 1), float("inf"), dtype=torch.float64)
    for i in range(n):
        alpha, sigma = float(grid.alpha[i]), float(grid.sigma[i])
        _, eps = parameterization.to_x0_eps(denoised[i], samples[i], alpha, sigma, "sample")
        for j in range(i + 1, n + 1):
            x_j = solvers.ddim_step(denoised[i], eps, float(grid.alpha[j]), float(grid.sigma[j]))
            cost[i, j] = (x_j - samples[j]).pow(2).mean().sqrt()
    return cost


def best_path(cost: torch.Tensor, num_steps: int) -> list[int]:
    """The nodes 0 = i_0 < ... < i_{K-1} (K = num_steps) minimising sum_k cost[i_k, i_{k+1}] with i_K the last node
    (dynamic programming over (steps taken, node), GITS Alg. 1)."""
    last = cost.shape[0] - 1
    best = torch.full((num_steps + 1, last + 1), float("inf"), dtype=torch.float64)
    parent = torch.zeros((num_steps + 1, last + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, num_steps + 1):
        totals = best[k - 1][:, None] + cost  # [from, to]
        best[k], parent[k] = totals.min(dim=0)
    nodes, node = [], last
    for k in range(num_steps, 0, -1):
        node = int(parent[k, node])
        nodes.append(node)
    return nodes[::-1]


# ---------------------------------------------------------------- the cache


def default_cache_path() -> Path:
    """`$LDM_CACHE_DIR/optimised_levels.json`, default `$XDG_CACHE_HOME/ldm-toolkit/` (`~/.cache/ldm-toolkit/`)."""
    root = os.environ.get("LDM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "ldm-toolkit"
    return Path(root).expanduser() / "optimised_levels.json"


def model_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a network's parameters and buffers (names, shapes, values): a `model_key` for an in-memory model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def _cache_key(config, num_steps, noise, fine_steps, sigma_min, model_key) -> str:
    noise_hash = hashlib.sha256(noise.detach().cpu().double().numpy().tobytes()).hexdigest()[:16]
    fields = {"version": CACHE_VERSION, "model": model_key, "schedule": {k: config.get(k) for k in SCHEDULE_KEYS},
              "prediction_type": config.get("prediction_type"), "num_steps": num_steps, "fine_steps": fine_steps,
              "sigma_min": sigma_min, "noise": [list(noise.shape), noise_hash]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # no cache yet, or a damaged one: recompute (and rewrite it)
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, allow_nan=False)  # strict JSON
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
