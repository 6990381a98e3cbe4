"""Checkpoints hold no pickle; planted pickles never run; pickle-format checkpoints need --allow_pickle;
a damaged latest checkpoint falls back to the newest intact one; resume stays bit-exact (tiny models)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_train import ENV, LAUNCH_2, REPO, args, fine_tune_args, summary

from training import checkpointing
from training.train import cli, main

RUN = ("--use_ema", "--train_text_encoder", "--checkpointing_steps", "2", "--lr_scheduler", "constant",
       "--learning_rate", "1e-3", "--prediction_type", "v_prediction")
PICKLE_PLACES = ["optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
                 "scheduler.bin", "pytorch_model.bin", "sampler.bin", "scaler.pt"]


class Payload:
    """Unpickling this runs a shell command that creates `marker` (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)


def write_accelerate_state(state, folder: Path) -> None:
    """What the previous version wrote: accelerate's save_state (optimizer/scheduler/EMA/RNG pickled)."""
    accelerator = state.accelerator
    accelerator.register_for_checkpointing(state.lr_scheduler, state.ema)
    accelerator.save_state(str(folder), safe_serialization=True)
    accelerator._custom_objects.clear()  # registered again at the next save


def make_legacy(out: Path) -> None:
    for checkpoint in checkpointing.list_checkpoints(out):
        step = checkpointing.read_state(checkpoint)["step"]
        (checkpoint / checkpointing.STATE_FILE).write_text(json.dumps({"step": step}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints 2 and 4), and a 2-step run in the old pickle format."""
    root = tmp_path_factory.mktemp("runs")
    main(args(root / "full", *RUN, steps=4))
    patch = pytest.MonkeyPatch()
    patch.setattr(checkpointing, "write_state_files", write_accelerate_state)
    try:
        main(args(root / "legacy", *RUN, steps=2))
    finally:
        patch.undo()
    make_legacy(root / "legacy")
    return root


def copy_run(runs: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def refused(out: Path, capsys, *extra: str) -> str:
    """Resume from `out` through the console entry point; it must exit 2 with one line, no traceback."""
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli(args(out, *RUN, "--resume_from_checkpoint", "latest", *extra, steps=4))
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in message
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    return message


def test_checkpoints_hold_no_pickle(runs):
    for checkpoint in checkpointing.list_checkpoints(runs / "full"):
        names = {p.name for p in checkpoint.iterdir()}
        assert not checkpointing.pickle_files(checkpoint)
        assert {"model.safetensors", "model_1.safetensors", "optimizer.safetensors", "ema.safetensors",
                "lr_scheduler.json", "random_states_0.safetensors", checkpointing.STATE_FILE} == names
        assert checkpointing.damage(checkpoint) is None


@pytest.mark.parametrize("place", PICKLE_PLACES)
def test_planted_pickle_never_runs(runs, tmp_path, capsys, place):
    """A payload in the old format's files, or added to a new checkpoint: refused, never unpickled."""
    marker = tmp_path / "marker"
    legacy, new = copy_run(runs, "legacy", tmp_path), copy_run(runs, "full", tmp_path)
    plant(legacy / "checkpoints" / "checkpoint-2" / place, marker)
    plant(new / "checkpoints" / "checkpoint-4" / place, marker)
    for out in (legacy, new):
        message = refused(out, capsys)
        assert place in message and "--allow_pickle" in message and "Refusing to resume" in message
    assert not marker.exists()


def test_allow_pickle_never_loads_pickles_a_new_checkpoint_does_not_need(runs, tmp_path, caplog):
    out, marker = copy_run(runs, "full", tmp_path), tmp_path / "marker"
    plant(out / "checkpoints" / "checkpoint-2" / "custom_checkpoint_0.pkl", marker)
    with caplog.at_level(logging.WARNING):
        main(args(out, *RUN, "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-2"), "--allow_pickle", steps=4))
    assert not marker.exists() and "they are not loaded" in caplog.text
    assert summary(out)["loss_history"] == summary(runs / "full")["loss_history"][2:]


def test_pickle_format_checkpoint_resumes_bit_exact_with_allow_pickle(runs, tmp_path, capsys):
    out = copy_run(runs, "legacy", tmp_path)
    message = refused(out, capsys)
    assert "accelerate's pickle format" in message and "optimizer.bin" in message
    main(args(out, *RUN, "--resume_from_checkpoint", "latest", "--allow_pickle", steps=4))
    assert summary(out)["loss_history"] == summary(runs / "full")["loss_history"][2:]
    assert summary(out)["final_validation_loss"] == summary(runs / "full")["final_validation_loss"]
    assert not checkpointing.pickle_files(out / "checkpoints" / "checkpoint-4")  # new checkpoints: no pickle


@pytest.mark.parametrize("name, damage", [("optimizer.safetensors", "truncate"), ("model.safetensors", "flip"),
                                         ("ema.safetensors", "delete"), (checkpointing.STATE_FILE, "truncate")])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(runs, tmp_path, caplog, name, damage):
    out = copy_run(runs, "full", tmp_path)
    victim = out / "checkpoints" / "checkpoint-4" / name
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[-10] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    shutil.rmtree(out / "model")
    with caplog.at_level(logging.WARNING):
        main(args(out, *RUN, "--resume_from_checkpoint", "latest", steps=4))
    assert str(victim) in caplog.text and "Falling back to" in caplog.text and "checkpoint-2" in caplog.text
    assert summary(out)["loss_history"] == summary(runs / "full")["loss_history"][2:]  # resumed at step 2


def test_every_checkpoint_damaged_is_an_error_naming_the_files(runs, tmp_path, capsys):
    out = copy_run(runs, "full", tmp_path)
    for checkpoint in checkpointing.list_checkpoints(out):
        (checkpoint / "model.safetensors").write_bytes(b"\0" * 16)
    message = refused(out, capsys)
    assert "No intact checkpoint" in message and message.count("model.safetensors") == 2


def test_explicit_damaged_checkpoint_is_refused(runs, tmp_path, capsys):
    out = copy_run(runs, "full", tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    (checkpoint / "lr_scheduler.json").write_text("{}")
    message = refused(out, capsys, "--resume_from_checkpoint", str(checkpoint))
    assert "lr_scheduler.json" in message and "damaged" in message


def test_lora_resume_equals_uninterrupted(tmp_path):
    base = main(args(tmp_path / "base", "--prediction_type", "v_prediction"))
    run = lambda out, *extra, steps: main(fine_tune_args(base, out, "--lora_rank", "4", "--use_ema", "--learning_rate",
                                                         "1e-2", "--checkpointing_steps", "2", *extra, steps=steps))
    run(tmp_path / "full", steps=4)
    run(tmp_path / "parted", steps=2)
    run(tmp_path / "parted", "--resume_from_checkpoint", "latest", steps=4)
    assert summary(tmp_path / "parted")["loss_history"] == summary(tmp_path / "full")["loss_history"][2:]
    assert summary(tmp_path / "parted")["final_validation_loss"] == summary(tmp_path / "full")["final_validation_loss"]


@pytest.mark.slow
def test_two_process_resume_equals_uninterrupted(tmp_path):
    """Real `accelerate launch --multi_gpu --num_processes 2` (two gloo CPU processes), EMA and text encoder."""
    full, parted = tmp_path / "full", tmp_path / "parted"
    for command in ([*LAUNCH_2, *args(full, *RUN, steps=4)],
                    [*LAUNCH_2, *args(parted, *RUN, "--resume_from_checkpoint", str(full / "checkpoints/checkpoint-2"), steps=4)]):
        result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = full / "checkpoints" / "checkpoint-2"
    assert {"random_states_0.safetensors", "random_states_1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not checkpointing.pickle_files(checkpoint)
    assert summary(parted)["loss_history"] == summary(full)["loss_history"][2:]
    assert summary(parted)["final_validation_loss"] == summary(full)["final_validation_loss"]
