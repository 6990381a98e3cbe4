"""Sampler accuracy on an analytic Gaussian mixture in 64 dimensions: ours against diffusers' stock schedulers.

The "model" is the exact denoiser of the mixture (`custom_schedulers.analytic`), called like a network:
`model(x_in, t)` with the timestep the scheduler passes, mapped to (alpha, sigma) by the training schedule
(linear in sigma/alpha between training timesteps, as diffusers' Euler interpolates). Every sampler runs
the diffusers loop (`x = noise * init_noise_sigma`, `scale_model_input`, `step`) from the same noise.

Reported, per sampler and NFE (model evaluations; Heun-type samplers take (NFE+1)//2 steps = NFE-1
evaluations, the last step being a single Euler step):
  * ODE error: RMS distance to the exact probability-flow ODE solution from x_T = noise at t = T-1 (what a
    pipeline starts from), solved by an adaptive 8th-order Runge-Kutta at rtol 1e-10;
  * SW2: sliced 2-Wasserstein distance (256 random directions) between the samples and fresh data samples;
    the exact ODE solution's own SW2 is the floor set by the sample count.

    python benchmarks/sampler_accuracy.py            # writes docs/sampler_accuracy.md (keeping its "## Notes") and .png
    python benchmarks/sampler_accuracy.py --quick    # fewer samples, no files
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import diffusers
import torch

from custom_schedulers import grids, registry
from custom_schedulers.analytic import GaussianMixture
from custom_schedulers.optimised_levels import optimise_levels
from custom_schedulers.schedules import schedule_from_config

NFES = (5, 10, 20, 50)
DOCS = Path(__file__).resolve().parent.parent / "docs"
BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, clip_sample=False)


@dataclass(frozen=True)
class Setup:
    """One model: its scheduler config, the data, the start noise and the exact answers."""

    name: str
    config: dict
    mixture: GaussianMixture
    noise: torch.Tensor
    reference: torch.Tensor  # exact ODE solution from noise at t = T-1
    data: torch.Tensor  # fresh samples of the mixture, for SW2


@dataclass(frozen=True)
class Candidate:
    label: str
    build: Callable[[dict], object]  # scheduler config -> scheduler
    two_evaluations_per_step: bool = False
    stochastic: bool = False
    optimised_levels: bool = False  # GITS levels from the model (`custom_schedulers.optimised_levels`)


# ---------------------------------------------------------------- the model and the loop


def exact_model(setup: Setup) -> Callable:
    schedule = schedule_from_config(setup.config)
    prediction_type = setup.config["prediction_type"]

    def model(x_in: torch.Tensor, t) -> torch.Tensor:
        alpha, sigma = (float(v) for v in grids.alpha_sigma_at_timestep(schedule, torch.as_tensor(t).reshape(1)))
        return setup.mixture.model_output(x_in, alpha, sigma, prediction_type)

    return model


def run(scheduler, setup: Setup, num_steps: int, seed: int = 0, optimised: bool = False) -> tuple[torch.Tensor, int]:
    """The diffusers denoising loop; returns the final sample and the number of model evaluations.
    `optimised`: levels chosen by GITS from 16 noise samples of their own (not the benchmark's noise)."""
    model = exact_model(setup)
    if optimised:
        gits_noise = torch.randn(16, setup.noise.shape[1], generator=torch.Generator().manual_seed(123),
                                 dtype=torch.float64)
        scheduler.set_timesteps(sigmas=optimise_levels(model, scheduler, num_steps, gits_noise))
    else:
        scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    x = setup.noise * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch has none
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # FlowMatch has none
    takes_generator = "generator" in scheduler.step.__code__.co_varnames
    for t in scheduler.timesteps:
        out = model(scale(x, t), t)
        kwargs = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x, len(scheduler.timesteps)


def sliced_w2(x: torch.Tensor, data: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance, each 1-D distance by matching x's sorted projections to data quantiles."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], directions, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0)
    px, pd = (x.double() @ theta).sort(0).values, data.double() @ theta
    levels = (torch.arange(x.shape[0], dtype=torch.float64) + 0.5) / x.shape[0]
    quantiles = torch.quantile(pd, levels, dim=0)
    return float(((px - quantiles) ** 2).mean().sqrt())


# ---------------------------------------------------------------- setups


def make_setup(name: str, config: dict, batch: int, mixture_shape: tuple[float, float], seed: int = 0) -> Setup:
    """16 components in 64 dims, per-coordinate std and mean spread `mixture_shape`."""
    std, spread = mixture_shape
    mixture = GaussianMixture.random(num_components=16, dim=64, std=std, spread=spread, seed=seed)
    noise = torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    start = registry.build("ddim", config)  # its grid starts at t = T-1, where the pipeline's noise lives
    start.set_timesteps(10)
    reference = mixture.ode_solution(noise, *start.noise_level_at(0), rtol=1e-10)
    data = mixture.sample(8 * batch, torch.Generator().manual_seed(seed + 2))
    return Setup(name, config, mixture, noise, reference, data)


def ours(name: str, **options) -> Callable:
    return lambda config: registry.build(name, config, **options)


def stock(cls_name: str, **options) -> Callable:
    return lambda config: getattr(diffusers, cls_name).from_config(config, **options)


# Our step placement + final step: log-SNR-uniform levels down to sigma/alpha = 0.1, then x_0 extrapolated to 0.
# sigma_min = 0.1 was chosen on the SD setup (0.06 and 0.12 do about as well, 0.029 and 0.25 worse; see the notes)
# and is used unchanged on the cosine and flow setups.
TUNED = {"sigma_schedule": "exponential", "sigma_min": 0.1, "final_step": "extrapolate"}
# Our recommended configuration (chosen after the first full run among the tuned rows, see the notes).
RECOMMENDED = "ours DPM++ 2M + AM corrector (exponential"


def vp_candidates() -> list[Candidate]:
    heun = {"two_evaluations_per_step": True}
    return [
        Candidate("ours DDIM (trailing)", ours("ddim")),
        Candidate("ours Euler (trailing)", ours("euler")),
        Candidate("ours Heun (trailing)", ours("heun"), **heun),
        Candidate("ours Heun (karras)", ours("heun", sigma_schedule="karras"), **heun),
        Candidate("ours RF-Euler (trailing)", ours("rf-euler")),
        Candidate("ours RF-Heun (trailing)", ours("rf-heun"), **heun),
        Candidate("ours DPM++ 2M (trailing)", ours("dpmpp-2m")),
        Candidate("ours DPM++ 2M (karras)", ours("dpmpp-2m", sigma_schedule="karras")),
        Candidate("ours DPM++ 2M (exponential)", ours("dpmpp-2m", sigma_schedule="exponential")),
        Candidate("ours DPM++ 3M (trailing)", ours("dpmpp-3m")),
        Candidate("ours DPM++ 3M (karras)", ours("dpmpp-3m", sigma_schedule="karras")),
        Candidate("ours DPM++ 3M (exponential)", ours("dpmpp-3m", sigma_schedule="exponential")),
        Candidate("ours DPM++ 2M (exponential, σmin 0.1, extrapolate)", ours("dpmpp-2m", **TUNED)),
        Candidate("ours DPM++ 3M (karras, σmin 0.1, extrapolate)", ours("dpmpp-3m", **dict(TUNED, sigma_schedule="karras"))),
        Candidate("ours DPM++ 3M (exponential, σmin 0.1, extrapolate)", ours("dpmpp-3m", **TUNED)),
        Candidate("ours DPM++ 2M + AM corrector (exponential, σmin 0.1, extrapolate)",
                  ours("dpmpp-2m", corrector="adams-moulton", **TUNED)),
        Candidate("ours DPM++ 3M + AM corrector (exponential, σmin 0.1, extrapolate)",
                  ours("dpmpp-3m", corrector="adams-moulton", **TUNED)),
        Candidate("ours DPM++ 2M PC (dpmpp-2m-pc, AYS levels)", ours("dpmpp-2m-pc", sigma_schedule="align-your-steps")),
        Candidate("ours DPM++ 2M (beta)", ours("dpmpp-2m", sigma_schedule="beta")),
        Candidate("ours DPM++ 2M (kl-optimal)", ours("dpmpp-2m", sigma_schedule="kl-optimal")),
        Candidate("ours DPM++ 2M (sgm-uniform)", ours("dpmpp-2m", sigma_schedule="sgm-uniform")),
        Candidate("ours UniPC bh2 (trailing)", ours("unipc")),
        Candidate("ours UniPC bh1 (trailing)", ours("unipc-bh1")),
        Candidate("ours UniPC bh2 (karras)", ours("unipc", sigma_schedule="karras")),
        Candidate("ours UniPC bh2-3 (karras)", ours("unipc", solver_order=3, sigma_schedule="karras")),
        Candidate("ours UniPC bh2 (exponential, σmin 0.1)", ours("unipc", sigma_schedule="exponential", sigma_min=0.1)),
        *wave_2_candidates(flow=False),
        Candidate("ours DDPM", ours("ddpm"), stochastic=True),
        Candidate("ours DPM++ 2M SDE (karras)", ours("dpmpp-2m-sde", sigma_schedule="karras"), stochastic=True),
        Candidate("ours Euler a (trailing)", ours("euler-a"), stochastic=True),
        Candidate("ours DPM++ 2S a (karras)", ours("dpmpp-2s-a", sigma_schedule="karras"), stochastic=True,
                  two_evaluations_per_step=True),
        Candidate("ours DPM++ SDE (karras)", ours("dpmpp-sde", sigma_schedule="karras"), stochastic=True,
                  two_evaluations_per_step=True),
        Candidate("ours LCM", ours("lcm"), stochastic=True),
        *other_stock_candidates(),
        Candidate("diffusers DDIM (default)", stock("DDIMScheduler")),
        Candidate("diffusers DDIM (trailing)", stock("DDIMScheduler", timestep_spacing="trailing")),
        Candidate("diffusers Euler (default)", stock("EulerDiscreteScheduler")),
        Candidate("diffusers Euler (karras)", stock("EulerDiscreteScheduler", use_karras_sigmas=True)),
        Candidate("diffusers Heun (default)", stock("HeunDiscreteScheduler"), **heun),
        Candidate("diffusers Heun (karras)", stock("HeunDiscreteScheduler", use_karras_sigmas=True), **heun),
        Candidate("diffusers DPM++ 2M (default)", stock("DPMSolverMultistepScheduler")),
        Candidate("diffusers DPM++ 2M (karras)", stock("DPMSolverMultistepScheduler", use_karras_sigmas=True)),
        Candidate("diffusers DPM++ 3M (karras)",
                  stock("DPMSolverMultistepScheduler", solver_order=3, use_karras_sigmas=True)),
        Candidate("diffusers UniPC (default)", stock("UniPCMultistepScheduler")),
        Candidate("diffusers UniPC (karras)", stock("UniPCMultistepScheduler", use_karras_sigmas=True)),
    ]


def wave_2_candidates(flow: bool) -> list[Candidate]:
    """iPNDM, DEIS, RES, exponential Heun, ER-SDE, DPM++ 3M SDE on the default grid (flow: FlowMatch's), and GITS
    levels (`optimised_levels`) under the recommended configuration and UniPC."""
    grid = "flow-match" if flow else "trailing"
    gits = {"optimised_levels": True}
    s_min = {"sigma_min": 0.09} if flow else {}
    return [
        Candidate(f"ours iPNDM ({grid})", ours("ipndm")),
        Candidate(f"ours iPNDM-v ({grid})", ours("ipndm-v")),
        Candidate("ours iPNDM-v (exponential)", ours("ipndm-v", sigma_schedule="exponential")),
        Candidate(f"ours DEIS ({grid})", ours("deis")),
        Candidate("ours DEIS (exponential)", ours("deis", sigma_schedule="exponential")),
        Candidate(f"ours RES multistep ({grid})", ours("res-multistep")),
        Candidate("ours RES multistep (exponential)", ours("res-multistep", sigma_schedule="exponential")),
        Candidate(f"ours exp Heun 2 x0 ({grid})", ours("exp-heun-2-x0"), two_evaluations_per_step=True),
        Candidate("ours exp Heun 2 x0 (exponential)", ours("exp-heun-2-x0", sigma_schedule="exponential"),
                  two_evaluations_per_step=True),
        Candidate("ours DPM++ 2M PC + GITS levels", ours("dpmpp-2m-pc", **s_min), **gits),
        Candidate("ours UniPC bh2 (extrapolate) + GITS levels", ours("unipc", final_step="extrapolate"), **gits),
        Candidate("ours DPM++ 3M (extrapolate) + GITS levels", ours("dpmpp-3m", final_step="extrapolate"), **gits),
        Candidate("ours iPNDM-v + GITS levels", ours("ipndm-v"), **gits),
        Candidate(f"ours ER-SDE ({grid})", ours("er-sde"), stochastic=True),
        Candidate(f"ours DPM++ 3M SDE ({grid})", ours("dpmpp-3m-sde"), stochastic=True),
    ]


def other_stock_candidates() -> list[Candidate]:
    """The rest of the registry's stock names, default options."""
    two = {"two_evaluations_per_step": True}
    return [
        Candidate("diffusers PNDM (default)", stock("PNDMScheduler")),
        Candidate("diffusers LMS (default)", stock("LMSDiscreteScheduler")),
        Candidate("diffusers DPM++ 2S (default)", stock("DPMSolverSinglestepScheduler")),
        Candidate("diffusers DEIS (default)", stock("DEISMultistepScheduler")),
        Candidate("diffusers KDPM2 (default)", stock("KDPM2DiscreteScheduler"), **two),
        Candidate("diffusers DDPM (default)", stock("DDPMScheduler"), stochastic=True),
        Candidate("diffusers Euler a (default)", stock("EulerAncestralDiscreteScheduler"), stochastic=True),
        Candidate("diffusers KDPM2 a (default)", stock("KDPM2AncestralDiscreteScheduler"), stochastic=True, **two),
        Candidate("diffusers DPM++ SDE (default)", stock("DPMSolverSDEScheduler"), stochastic=True, **two),
        Candidate("diffusers LCM (default)", stock("LCMScheduler"), stochastic=True),
        Candidate("diffusers TCD (default)", stock("TCDScheduler"), stochastic=True),
    ]


def flow_candidates() -> list[Candidate]:
    heun = {"two_evaluations_per_step": True}
    trailing = {"sigma_schedule": "default"}  # our training-grid option; a FlowMatch config defaults to "flow-match"
    return [
        Candidate("ours RF-Euler (trailing)", ours("rf-euler", **trailing)),
        Candidate("ours RF-Heun (trailing)", ours("rf-heun", **trailing), **heun),
        Candidate("ours RF-Euler (flow-match)", ours("rf-euler")),
        Candidate("ours RF-Heun (flow-match)", ours("rf-heun"), **heun),
        Candidate("ours DDIM (flow-match)", ours("ddim")),
        Candidate("ours Euler (flow-match)", ours("euler")),
        Candidate("ours Heun (flow-match)", ours("heun"), **heun),
        Candidate("ours DPM++ 2M (trailing)", ours("dpmpp-2m", **trailing)),
        Candidate("ours DPM++ 2M (flow-match)", ours("dpmpp-2m")),
        Candidate("ours DPM++ 3M (trailing)", ours("dpmpp-3m", **trailing)),
        Candidate("ours UniPC bh2 (flow-match)", ours("unipc")),
        Candidate("ours UniPC bh1 (flow-match)", ours("unipc-bh1")),
        Candidate("ours UniPC bh2 (exponential, s_min 0.09)", ours("unipc", sigma_schedule="exponential", sigma_min=0.09)),
        Candidate("ours DPM++ 3M (exponential, s_min 0.09, extrapolate)", ours("dpmpp-3m", **dict(TUNED, sigma_min=0.09))),
        Candidate("ours DPM++ 2M + AM corrector (exponential, s_min 0.09, extrapolate)",
                  ours("dpmpp-2m", corrector="adams-moulton", **dict(TUNED, sigma_min=0.09))),
        *wave_2_candidates(flow=True),
        Candidate("ours DPM++ 2M SDE (flow-match)", ours("dpmpp-2m-sde"), stochastic=True),
        Candidate("ours Euler a (flow-match)", ours("euler-a"), stochastic=True),
        Candidate("ours DDPM (flow-match)", ours("ddpm"), stochastic=True),
        Candidate("ours LCM (flow-match)", ours("lcm"), stochastic=True),
        Candidate("diffusers FlowMatchEuler (default)", stock("FlowMatchEulerDiscreteScheduler")),
        Candidate("diffusers FlowMatchHeun (default)", stock("FlowMatchHeunDiscreteScheduler"), **heun),
        Candidate("diffusers UniPC (flow sigmas)", stock("UniPCMultistepScheduler", beta_schedule="linear", use_flow_sigmas=True, flow_shift=3.0,
                                                         prediction_type="flow_prediction")),
    ]


# ---------------------------------------------------------------- measuring and reporting


def measure(setup: Setup, candidate: Candidate) -> dict:
    row = {"setup": setup.name, "label": candidate.label, "stochastic": candidate.stochastic, "cells": {}}
    for nfe in NFES:
        steps = (nfe + 1) // 2 if candidate.two_evaluations_per_step else nfe
        try:
            x, used = run(candidate.build(setup.config), setup, steps, optimised=candidate.optimised_levels)
            per_sample = (x - setup.reference).pow(2).mean(1).sqrt()
            error = float(per_sample.pow(2).mean().sqrt())
            w2 = sliced_w2(x, setup.data) if torch.isfinite(x).all() else math.nan
            row["cells"][nfe] = {"error": error, "median": float(per_sample.median()), "sw2": w2, "nfe": used}
        except Exception as exc:  # a stock scheduler that fails on this setup is a result, not a crash
            row["cells"][nfe] = {"error": math.nan, "median": math.nan, "sw2": math.nan, "nfe": steps,
                                 "failure": type(exc).__name__}
    return row


def fmt(cell: dict, key: str, nfe: int) -> str:
    if "failure" in cell:
        return f"fails ({cell['failure']})"
    value = cell[key]
    text = "diverges" if not math.isfinite(value) or value > 1e3 else f"{value:.2e}"
    return text + (f" [{cell['nfe']}]" if cell["nfe"] != nfe else "")


def markdown(rows: list[dict], setup: Setup, key: str, title: str) -> str:
    lines = [f"#### {title}", "", "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|" + "---|" * len(NFES)]
    for row in rows:
        if key != "sw2" and row["stochastic"]:
            continue
        lines.append(f"| {row['label']} | " + " | ".join(fmt(row["cells"][n], key, n) for n in NFES) + " |")
    if key == "sw2":
        lines.append(f"| exact ODE solution (floor) | {sliced_w2(setup.reference, setup.data):.2e} |" + " |" * 3)
    return "\n".join(lines)


def best(rows: list[dict], prefix: str, nfe: int, key: str = "error") -> tuple[str, float]:
    """The best deterministic row at this NFE column; a row that spent more evaluations there (PNDM's warm-up)
    does not count."""
    finite = [(r["label"], r["cells"][nfe][key]) for r in rows
              if r["label"].startswith(prefix) and not r["stochastic"] and math.isfinite(r["cells"][nfe][key])
              and r["cells"][nfe]["nfe"] <= nfe]
    return min(finite, key=lambda item: item[1])


PLOTTED = (  # a readable subset of the rows (prefix match); the tables have all of them
    RECOMMENDED, "ours DPM++ 2M PC + GITS levels", "ours DPM++ 3M (exponential, σmin", "ours DPM++ 3M (exponential, s_min", "ours DPM++ 2M (karras)",
    "ours DDIM (trailing)", "ours Heun (trailing)", "ours RF-Euler (trailing)", "diffusers DDIM (default)",
    "diffusers DPM++ 2M (default)", "diffusers DPM++ 2M (karras)", "diffusers UniPC (default)",
    "diffusers UniPC (karras)", "diffusers Heun (default)", "diffusers FlowMatchEuler", "diffusers FlowMatchHeun",
)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 15))
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, (name, rows) in zip(axes.flat, results.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for row in rows:
            if row["stochastic"] or not row["label"].startswith(PLOTTED):
                continue
            points = [(c["nfe"], c["error"]) for c in row["cells"].values() if math.isfinite(c["error"])]
            if points:
                style = "-" if row["label"].startswith("ours") else "--"
                ax.loglog(*zip(*points), style, marker="o", ms=3, label=row["label"])
        ax.set(title=name, xlabel="NFE (model evaluations)", ylabel="RMS error to the exact ODE solution",
               ylim=(1e-4, 2.0))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)  # atomic


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".md", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


SD = dict(BASE, beta_schedule="scaled_linear", prediction_type="epsilon")
COSINE = dict(BASE, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
ZTSNR = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "beta_schedule": "flow", "prediction_type": "flow"}
OVERLAPPING, SEPARATED = (0.5, 0.3), (0.25, 0.6)  # (component std, mean spread) per coordinate
SETUPS = {  # name: (scheduler config, mixture shape, candidates)
    "SD scaled-linear, epsilon": (SD, OVERLAPPING, vp_candidates),
    "cosine, v-prediction": (COSINE, OVERLAPPING, vp_candidates),
    "SD zero terminal SNR, v-prediction": (ZTSNR, OVERLAPPING, vp_candidates),
    "rectified flow (shift 3), flow": (FLOW, OVERLAPPING, flow_candidates),
    "SD scaled-linear, epsilon, well-separated modes": (SD, SEPARATED, vp_candidates),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 samples and print only (no files)")
    parser.add_argument("--batch", type=int, default=1024, help="samples per run")
    args = parser.parse_args()
    batch = 256 if args.quick else args.batch
    started = time.time()
    results, sections = {}, []
    for name, (config, mixture_shape, candidates) in SETUPS.items():
        setup = make_setup(name, config, batch, mixture_shape)
        rows = [measure(setup, c) for c in candidates()]
        results[name] = rows
        std, spread = mixture_shape
        sections += [f"### {name}", "", f"Mixture: component std {std}, mean spread {spread} per coordinate.", "",
                     markdown(rows, setup, "error", "RMS error to the exact ODE solution"), "",
                     markdown(rows, setup, "median", "Median per-sample error to the exact ODE solution"), "",
                     markdown(rows, setup, "sw2", "Sliced W2 to the data distribution"), ""]
    headline = summary(results)
    report = "\n".join([
        "# Sampler accuracy", "", "Generated by `python benchmarks/sampler_accuracy.py`; method in its docstring.",
        "Cells: value [actual NFE if below the column's]. Plot: `sampler_accuracy.png`.", "",
        "## Headline: NFE 10", "", headline, "", "## Targets (issue 15)", "", targets(results), "", *sections,
        f"_{batch} samples per run, {time.time() - started:.0f} s._", "",
    ])
    print(report)
    if not args.quick:
        DOCS.mkdir(exist_ok=True)
        path = DOCS / "sampler_accuracy.md"
        write_atomic(path, report + preserved_notes(path))
        plot(results, DOCS / "sampler_accuracy.png")


def preserved_notes(path: Path) -> str:
    """The hand-written "## Notes" section of an existing report (the numbers above it are regenerated)."""
    text = path.read_text() if path.exists() else ""
    start = text.find("\n## Notes")
    return text[start:] if start >= 0 else ""


def summary(results: dict[str, list[dict]]) -> str:
    lines = ["| setup | metric | ours, recommended | ours, best row | diffusers, best row | diffusers best / ours recommended |",
             "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for key in ("error", "median"):
            recommended = next(r["cells"][10][key] for r in rows if r["label"].startswith(RECOMMENDED))
            (ol, oe), (dl, de) = best(rows, "ours", 10, key), best(rows, "diffusers", 10, key)
            lines.append(f"| {name} | {'RMS' if key == 'error' else 'median'} | {recommended:.2e} | {ol}: {oe:.2e} "
                         f"| {dl}: {de:.2e} | {de / recommended:.1f}x |")
    return "\n".join(lines)


def targets(results: dict[str, list[dict]]) -> str:
    """The issue's targets, measured: our best deterministic row against the stated bound."""
    lines = ["| target | ours, best row | bound | met |", "|---|---|---|---|"]

    def row(text: str, setup: str, nfe: int, bound: float, bound_text: str) -> None:
        label, value = best(results[setup], "ours", nfe)
        lines.append(f"| {text} | {label}: {value:.2e} | {bound_text}: {bound:.2e} | {'yes' if value <= bound else 'no'} |")

    sd = results["SD scaled-linear, epsilon"]
    ddim_50 = next(r["cells"][50]["error"] for r in sd if r["label"] == "diffusers DDIM (default)")
    row("SD, NFE 5 <= diffusers DDIM at NFE 50", "SD scaled-linear, epsilon", 5, ddim_50, "DDIM-50")
    for setup, nfe in [("cosine, v-prediction", 5), ("SD zero terminal SNR, v-prediction", 5),
                       ("rectified flow (shift 3), flow", 10), ("rectified flow (shift 3), flow", 20)]:
        label, value = best(results[setup], "diffusers", nfe)
        row(f"{setup}, NFE {nfe} <= half diffusers' best", setup, nfe, value / 2, f"half of {label}")
    broken = [f"{name}: {r['label']} NFE {n}" for name, rows in results.items() for r in rows
              if r["label"].startswith("ours") for n, c in r["cells"].items()
              if "failure" in c or not math.isfinite(c["error"]) or c["error"] > 1e3]
    lines += ["", f"Failing or diverging rows of ours: {', '.join(broken) or 'none'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
