"""`ldm-generate --xyz` and `--hires`: real subprocesses (and in-process runs to compare images with)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from ldm_pipeline import metadata
from ldm_pipeline.generate import main
from tests.test_lora_loading import write_lora
from training.lora_export import KOHYA_FILE
from training.tiny_models import tiny_sd_components

REPO = Path(__file__).resolve().parents[1]
RUN = ["--width", "32", "--height", "32", "--seed", "9"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-xyz") / "tiny"
    StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False).save_pretrained(str(folder))
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ldm_pipeline", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def single(model: Path, out: Path, *args: str) -> np.ndarray:
    """The image `ldm-generate` makes for one prompt (in-process)."""
    assert main(["a red circle", "--model", str(model), "--out", str(out), *RUN, *args]) == 0
    return pixels(out / "00000_000.png")


def test_xyz_writes_the_cells_and_a_labelled_grid(model, tmp_path):
    out = tmp_path / "grid"
    done = cli("a red circle", "--model", str(model), "--out", str(out), *RUN,
               "--xyz", "Sampler: euler, DDIM", "--xyz", "Steps: 2, 3")
    assert done.returncode == 0, done.stderr
    assert "cell 4 of 4 done" in done.stderr
    grids = list(out.glob("xyz-*.png"))
    cells = sorted(set(out.glob("*.png")) - set(grids))
    assert len(grids) == 1 and len(cells) == 4
    grid = metadata.read_png(grids[0]).parameters
    assert (grid["Script"], grid["X Type"], grid["X Values"], grid["Y Values"]) == (
        "X/Y/Z plot", "Sampler", "euler, DDIM", "2, 3")
    assert Image.open(grids[0]).width > 2 * 32 and Image.open(grids[0]).height > 2 * 32
    made = {(p["Sampler"], p["Steps"]): path for path in cells for p in [metadata.read_png(path).parameters]}
    assert set(made) == {("Euler", "2"), ("Euler", "3"), ("DDIM", "2"), ("DDIM", "3")}
    expected = single(model, tmp_path / "alone", "--scheduler", "euler", "--steps", "3")
    assert np.array_equal(pixels(made[("Euler", "3")]), expected)


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `ldm-generate` run in this process (argparse errors exit with 2)."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("axes, message", [
    (["Width: 32, 64"], "Unknown X/Y/Z axis 'Width'"),
    (["Steps: 2, two"], "X axis (Steps): 'two' is not a whole number"),
    (["Steps: 2, 5000"], "Cell (Steps: 5000): Steps (num_inference_steps) must be a whole number from 1 to 999"),
])
def test_a_bad_axis_or_cell_stops_before_any_image(model, tmp_path, capsys, axes, message):
    out = tmp_path / "out"
    args = [arg for axis in axes for arg in ("--xyz", axis)]
    code, err = run_in_process(["a red circle", "--model", str(model), "--out", str(out), *RUN, *args], capsys)
    assert code == 2 and message in err, err
    assert not list(out.glob("*.png")) if out.exists() else True


def test_lora_weight_axis_scales_the_lora_named_in_the_prompt(model, tmp_path, capsys):
    loras = tmp_path / "loras"
    loras.mkdir()
    lora = loras / "style.safetensors"
    shutil.copy(write_lora(tmp_path / "trained", seed=1) / KOHYA_FILE, lora)
    out = tmp_path / "grid"
    assert main(["a red circle <lora:style:1>", "--model", str(model), "--out", str(out), *RUN, "--steps", "2",
                 "--lora-dir", str(loras), "--xyz", "LoRA weight: 0, 1"]) == 0
    cells = {metadata.read_png(p).recipe["cross_attention_kwargs"]["scale"]: p
             for p in out.glob("*.png") if not p.name.startswith("xyz")}
    assert set(cells) == {0.0, 1.0}
    assert metadata.read_png(cells[1.0]).recipe["loras"][0]["name"] == "style"
    assert np.array_equal(pixels(cells[0.0]), single(model, tmp_path / "base", "--steps", "2"))
    assert np.array_equal(pixels(cells[1.0]), single(model, tmp_path / "lora", "--steps", "2", "--lora", str(lora)))
    code, err = run_in_process(["a red circle", "--model", str(model), "--out", str(tmp_path / "no"), *RUN,
                                "--lora", str(lora), "--xyz", "LoRA weight: 0, 1"], capsys)
    assert code == 2 and "with --xyz, name LoRAs in the prompt as <lora:NAME:W>" in err


def test_hires_flag_makes_the_upscaled_image_and_records_it(model, tmp_path):
    out = tmp_path / "hires"
    done = cli("a red circle", "--model", str(model), "--out", str(out), *RUN, "--steps", "3",
               "--hires", "2", "--hires-steps", "2", "--hires-strength", "0.5", "--hires-upscaler", "latent-nearest")
    assert done.returncode == 0, done.stderr
    image = out / "00000_000.png"
    assert Image.open(image).size == (64, 64)
    found = metadata.read_png(image)
    assert found.recipe["hires"] == {"scale": 2.0, "steps": 2, "strength": 0.5, "upscaler": "Latent (nearest)"}
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)" in found.parameters_text
    assert found.parameters["Size"] == "32x32"  # the base size, as A1111 writes it


def test_hires_options_need_hires_and_bad_values_name_the_problem(model, tmp_path, capsys):
    code, err = run_in_process(["a red circle", "--model", str(model), "--out", str(tmp_path), "--hires-steps", "4"],
                               capsys)
    assert code == 2 and "need --hires FACTOR" in err
    code, err = run_in_process(["a red circle", "--model", str(model), "--out", str(tmp_path / "bad"), *RUN,
                                "--steps", "2", "--hires", "2", "--hires-upscaler", "ESRGAN"], capsys)
    assert code == 1 and "Unknown hires upscaler 'ESRGAN'" in err
