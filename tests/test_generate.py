"""Batch CLI: bad lines, seeds, resume, kill-and-resume of a real process, 2-process `accelerate launch`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from ldm_pipeline import metadata
from ldm_pipeline.generate import main
from ldm_pipeline.options import SEED_STRIDE, image_seeds, line_seed
from training.tiny_models import tiny_sd_components

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--width", "32", "--height", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    lines = [
        {"prompt": "a red circle", "n": 2},
        {"prompt": "a blue square", "seed": 7, "scheduler": "EulerDiscreteScheduler", "guidance_interval": [0.5, 5]},
        {"prompt": "a green triangle", "n": 3, "guidance_schedule": "cosine", "negative_prompt": "dark"},
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def assert_same_images(a: dict, b: dict) -> None:
    """Same files, same pixels up to one 8-bit level: a batch of another size runs other float kernels."""
    assert a.keys() == b.keys()
    for name in b:
        difference = np.abs(a[name].astype(int) - b[name].astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.01, name


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(model, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert main(["--prompts", str(prompts), "--model", str(model), "--out", str(out), "--steps", "2", *SIZE]) == 0
    return out


def test_outputs_seeds_and_manifest(reference):
    names = sorted(p.name for p in reference.glob("*.png"))
    assert names == ["00000_000.png", "00000_001.png", "00001_000.png", "00002_000.png", "00002_001.png",
                     "00002_002.png"]
    manifest = [json.loads(line) for line in (reference / "manifest.jsonl").read_text().splitlines()]
    assert [m["file"] for m in manifest] == names
    seeds = {m["file"]: m["seed"] for m in manifest}
    assert seeds["00000_001.png"] == image_seeds(line_seed(0, 0), 2)[1] == 1
    assert seeds["00002_002.png"] == 2 * SEED_STRIDE + 2 and seeds["00001_000.png"] == 7
    recipe = metadata.read_png(reference / "00001_000.png").recipe
    assert recipe["scheduler"]["class"] == "EulerDiscreteScheduler" and recipe["seed"] == 7
    assert recipe["guidance"]["interval"] == {"sigma_lo": 0.5, "sigma_hi": 5.0}
    params = metadata.read_png(reference / "00002_000.png").parameters
    assert params["Prompt"] == "a green triangle" and params["Negative prompt"] == "dark"
    assert params["Guidance schedule"] == "cosine" and params["Seed"] == str(2 * SEED_STRIDE)


def test_pngs_name_the_model_but_never_reveal_its_path(model, reference):
    """A shared PNG says which model made it (name and hash, as A1111's "Model:" and "Model hash:") and not
    where the model sits on the machine that made it: no chunk holds the folder's path or its parent's."""
    for png in reference.glob("*.png"):
        chunks = " ".join(Image.open(png).text.values())
        assert str(model.parent) not in chunks and str(model.resolve().parent) not in chunks
        assert metadata.read_png(png).recipe["model"]["name"] == model.name


def test_batch_size_does_not_change_images(model, prompts, reference, tmp_path):
    assert main(["--prompts", str(prompts), "--model", str(model), "--out", str(tmp_path), "--steps", "2",
                 "--batch-size", "1", *SIZE]) == 0
    assert_same_images(pngs(tmp_path), pngs(reference))


def test_traced_unet_writes_the_same_images(model, prompts, reference, tmp_path):
    assert main(["--prompts", str(prompts), "--model", str(model), "--out", str(tmp_path), "--steps", "2",
                 "--trace", *SIZE]) == 0
    assert_same_images(pngs(tmp_path), pngs(reference))


def test_steps_and_guidance_default_to_the_models_record(model, tmp_path):
    """No --steps/--guidance: the model folder's record.json defaults, else SD's 30 steps at 7.5."""
    with_record = tmp_path / "model"
    shutil.copytree(model, with_record)
    (with_record / "record.json").write_text(json.dumps({"defaults": {"num_inference_steps": 3, "guidance_scale": 2.5}}))
    for folder, (steps, guidance), extra in ((with_record, (3, 2.5), []), (with_record, (2, 4.0), ["--steps", "2", "--guidance", "4"]),
                                             (model, (30, 7.5), [])):
        out = tmp_path / f"out-{len(extra)}-{folder.name}"
        assert main(["a red circle", "--model", str(folder), "--out", str(out), *SIZE, *extra]) == 0
        params = metadata.read_png(out / "00000_000.png").parameters
        assert (params["Steps"], params["CFG scale"]) == (str(steps), str(guidance)), folder


def test_bad_lines_are_reported_and_skipped(model, tmp_path, capsys):
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join([
        '{"prompt": "a red circle"}', '{"prompt": ""}', '{"prompt": "a star", "width": 36}',
        '{"prompt": "x", "scheduler": "warp-drive"}', "not json", '{"prompt": "y", "colour": "red"}',
        '{"prompt": "a blue square"}',
    ]) + "\n")
    code = main(["--prompts", str(file), "--model", str(model), "--out", str(tmp_path / "out"), "--steps", "1", *SIZE])
    err = capsys.readouterr().err
    assert code == 1
    for expected in ("line 2: The prompt is empty", "line 3: Width must be a multiple of 8",
                     "line 4: Unknown scheduler 'warp-drive'", "line 5: invalid JSON", "line 6: unknown key(s) colour"):
        assert expected in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000_000.png", "00006_000.png"]


def test_txt_file_and_bad_arguments(model, tmp_path, capsys):
    file = tmp_path / "p.txt"
    file.write_text("# a comment\na red circle\n\na blue square\n")
    assert main(["--prompts", str(file), "--model", str(model), "--out", str(tmp_path / "o"), "--steps", "1",
                 *SIZE]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["00001_000.png", "00003_000.png"]
    assert main(["a circle", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])  # neither a prompt nor --prompts


def test_rerun_skips_finished_images_and_redoes_changed_ones(model, prompts, tmp_path):
    args = ["--prompts", str(prompts), "--model", str(model), "--out", str(tmp_path), "--steps", "2", *SIZE]
    assert main(args) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    time.sleep(0.01)
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")} == stamps
    assert main([*args[:-6], "--steps", "3", *SIZE]) == 0  # a different request: made again
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in tmp_path.glob("*.png"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_complete_set(model, tmp_path):
    file = tmp_path / "many.txt"
    file.write_text("a red circle\na blue square\n")
    args = ["--prompts", str(file), "--model", str(model), "--steps", "15", "--n", "4", "--batch-size", "1", *SIZE]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "ldm_pipeline", *args, "--out", str(out)], cwd=REPO,
                               env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = list(out.glob("*.png"))
    assert 0 < len(finished) < 8, "the run was not interrupted midway"
    for png in finished:  # every file present is complete
        assert metadata.read_png(png).recipe is not None
    assert main([*args, "--out", str(out)]) == 0
    resumed, reference = pngs(out), pngs(tmp_path / "reference")
    assert resumed.keys() == reference.keys() and len(reference) == 8
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])
    assert not list(out.glob(".*.tmp"))
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 8


def launch(launcher_args: list[str], prompts: Path, model: Path, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldm_pipeline",
        "--prompts", str(prompts), "--model", str(model), "--out", str(out), "--steps", "2", *SIZE,
    ]
    return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_accelerate_launch_writes_what_one_process_writes(model, prompts, reference, tmp_path):
    # on a machine without CUDA, accelerate's torchrun launcher (--multi_gpu) starts the two CPU
    # processes; the CLI joins them with gloo and splits the 6 images 3 + 3
    result = launch(["--multi_gpu", "--num_processes", "2"], prompts, model, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0/2: 3 images in its share" in result.stderr
    assert "process 1/2: 3 images in its share" in result.stderr
    assert_same_images(pngs(tmp_path), pngs(reference))
    assert (tmp_path / "manifest.jsonl").read_text() == (reference / "manifest.jsonl").read_text()


@pytest.mark.slow
def test_accelerate_launch_cpu_flag_works(model, prompts, reference, tmp_path):
    # accelerate 1.x's `--num_processes 2 --cpu` starts two processes through mpirun when MPI is
    # installed, and otherwise one process (its simple launcher): either way every image once
    result = launch(["--num_processes", "2", "--cpu"], prompts, model, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process = "process 0/1: 6 images in its share" in result.stderr
    two_processes = all(f"process {i}/2: 3 images in its share" in result.stderr for i in (0, 1))
    assert one_process or two_processes, result.stderr[-3000:]
    assert_same_images(pngs(tmp_path), pngs(reference))
