"""The schedule study (`training/recipes/schedule_study/`, `benchmarks/schedule_study.py`) stays a fair comparison:
its runs differ only in the noise schedule, and the benchmark reads each trained model's schedule right."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from training.config import parse_config
from training.load_and_save import output_scheduler, resolve_objective

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "training" / "recipes" / "schedule_study").glob("*.yaml"))
SCHEDULE_KEYS = {"noise_schedule", "zero_terminal_snr"}


def study_configs() -> dict[str, dict]:
    return {path.stem: parse_config(["--config", str(path)]).flat() for path in RECIPES}


def test_the_study_configs_differ_only_in_the_schedule_and_run_directory():
    configs = study_configs()
    assert set(configs) == {"scaled_linear", "scaled_linear_zero_snr", "cosine", "cosine_zero_snr"}
    first = next(iter(configs.values()))
    differing = {key for config in configs.values() for key in first if config[key] != first[key]}
    assert differing == SCHEDULE_KEYS | {"output_dir"}
    # Each run its own schedule; the 2 x 2 of base schedule and zero-terminal-SNR rescale.
    schedules = {(c["noise_schedule"], c["zero_terminal_snr"]) for c in configs.values()}
    assert schedules == {(s, z) for s in ("scaled_linear", "cosine") for z in (False, True)}
    assert len({c["output_dir"] for c in configs.values()}) == len(configs)
    # The same objective otherwise (v-prediction: defined at SNR 0), budget, data and seed.
    assert first["prediction_type"] == "v_prediction" and first["from_scratch"] and not first["train_text_encoder"]
    for key, value in {"train_batch_size": 32, "seed": 0, "num_train_samples": 10000}.items():
        assert first[key] == value


def scaled_linear_terminal_snr(T=1000, beta_start=0.00085, beta_end=0.012) -> float:
    """SD's schedule (Rombach et al. 2022): betas linear in sqrt, alpha-bar_T = prod(1 - beta)."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, T) ** 2
    abar = np.prod(1 - betas)
    return abar / (1 - abar)


def cosine_terminal_snr(T=1000, s=0.008, max_beta=0.999) -> float:
    """Nichol & Dhariwal 2021 eq. 17, betas clipped at 0.999 (their Sec. 3.2; diffusers' squaredcos_cap_v2)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = np.minimum([1 - f(i + 1) / f(i) for i in range(T)], max_beta)
    abar = np.prod(1 - betas)
    return abar / (1 - abar)


@pytest.fixture(scope="module")
def schedule_study():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import schedule_study
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return schedule_study


@pytest.mark.parametrize("name", ["scaled_linear", "scaled_linear_zero_snr", "cosine", "cosine_zero_snr"])
def test_the_benchmark_reads_the_schedule_each_run_saves(schedule_study, name, tmp_path):
    """What the trainer saves for each config (`output_scheduler`) -> terminal SNR (closed form), own spacing,
    validation loss from train_summary.json."""
    config = parse_config(["--config", str(REPO / "training/recipes/schedule_study" / f"{name}.yaml")])
    output_scheduler(resolve_objective(config.objective, {})).save_pretrained(tmp_path / name / "model" / "scheduler")
    (tmp_path / name / "train_summary.json").write_text(json.dumps({"final_validation_loss": 0.25}))
    model = schedule_study.trained_model(tmp_path / name / "model")
    assert (model.name, model.validation_loss) == (name, 0.25)
    zero_snr = name.endswith("zero_snr")
    expected = 0.0 if zero_snr else scaled_linear_terminal_snr() if name == "scaled_linear" else cosine_terminal_snr()
    assert model.terminal_snr == pytest.approx(expected, rel=1e-6, abs=0)
    # Lin et al. 2023, Sec. 3.3: a zero-terminal-SNR model samples from t = T-1 (trailing); the others as SD ships.
    assert model.own_spacing == ("trailing" if zero_snr else "leading")


def test_the_benchmark_refuses_a_folder_without_a_scheduler(schedule_study, tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        schedule_study.trained_model(tmp_path)
