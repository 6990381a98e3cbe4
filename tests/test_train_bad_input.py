"""Bad training input: one readable line naming the option, exit code 2, no traceback, nothing written.

Each case runs the console entry point (`ldm-train` = `training.train:cli`) in-process. Option checks
happen before any model is loaded, so most cases take milliseconds; the few that need the tiny models
(a resolution the VAE cannot divide) build them from training/configs/tiny.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import TINY, args

from training.train import cli


def metadata_folder(tmp: Path, bad_line: str) -> Path:
    folder = tmp / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red"}) + "\n" + bad_line + "\n")
    return folder


def truncated_jpeg_folder(tmp: Path) -> Path:
    folder = tmp / "images"
    folder.mkdir()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "a.jpg")
    (folder / "a.jpg").write_bytes((folder / "a.jpg").read_bytes()[:1500])
    (folder / "a.txt").write_text("a noisy square")
    return folder


def config_file(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def scratch_folder(tmp: Path, name: str, text: str) -> Path:
    folder = tmp / "configs"
    shutil.copytree(TINY, folder)
    (folder / name).write_text(text)
    return folder


NO_SCRATCH = "drop --from_scratch"  # a case's first item: run without the tiny --from_scratch configs


# (id, extra flags given tmp_path, text the message must contain)
CASES = [
    ("logging_steps-0", lambda t: ["--logging_steps", "0"], "--logging_steps 0 must be >= 1"),
    ("batch-0", lambda t: ["--train_batch_size", "0"], "--train_batch_size 0 must be >= 1"),
    ("lr-negative", lambda t: ["--learning_rate=-1e-3"], "--learning_rate -0.001 must be > 0"),
    ("lr-nan", lambda t: ["--learning_rate", "nan"], "--learning_rate nan must be a finite number"),
    ("beta2-inf", lambda t: ["--adam_beta2", "inf"], "--adam_beta2 inf must be a finite number"),
    ("max_steps-0", lambda t: ["--max_train_steps", "0"], "--max_train_steps 0 must be >= 1"),
    ("accumulation-0", lambda t: ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    ("checkpointing-0", lambda t: ["--checkpointing_steps", "0"], "--checkpointing_steps 0 must be >= 1"),
    ("validation-negative", lambda t: ["--validation_steps", "-5"], "--validation_steps -5 must be >= 1"),
    ("beta1-1", lambda t: ["--adam_beta1", "1"], "--adam_beta1 1.0 must be >= 0 and < 1"),
    ("caption-dropout-1", lambda t: ["--caption_dropout", "1"], "--proportion_empty_prompts 1.0 must be >= 0 and < 1"),
    ("seed-negative", lambda t: ["--seed=-1"], "--seed -1 must be >= 0 and < 4294967296"),
    ("ema-decay", lambda t: ["--ema_decay", "1.5"], "--ema_decay 1.5 must be >= 0 and <= 1"),
    ("noise-offset", lambda t: ["--noise_offset=-0.1"], "--noise_offset -0.1 must be >= 0"),
    ("timesteps-1", lambda t: ["--num_train_timesteps", "1"], "--num_train_timesteps 1 must be >= 2"),
    ("resolution-tiny", lambda t: ["--resolution", "4"], "--resolution 4 must be >= 8"),
    ("lora-rank-0", lambda t: ["--lora_rank", "0"], "--lora_rank 0 must be >= 1"),
    ("lora-alpha-alone", lambda t: ["--lora_alpha", "8"], "--lora_alpha needs --lora_rank"),
    ("snr-floor-alone", lambda t: ["--snr_floor", "1"], "--snr_floor bounds the Min-SNR weights: it needs --snr_gamma"),
    ("eps-zero-snr", lambda t: ["--prediction_type", "epsilon", "--zero_terminal_snr"], "--zero_terminal_snr"),
    ("vae-and-lora", lambda t: ["--lora_rank", "2", "--train_vae"], "--train_vae trains only"),
    ("unknown-colour", lambda t: ["--shapes_colors", "red", "teal"], "--shapes_colors ['teal'] unknown"),
    ("bad-int", lambda t: ["--train_batch_size", "four"], "--train_batch_size: invalid int value"),
    ("bad-choice", lambda t: ["--report_to", "wandb"], "--report_to: invalid choice"),
    ("folder-missing", lambda t: ["--train_data_dir", str(t / "nope")], "--train_data_dir"),
    ("folder-without-dir", lambda t: ["--dataset", "folder"], "--dataset folder needs --train_data_dir"),
    ("scratch-missing", lambda t: ["--from_scratch", str(t / "nope")], "--from_scratch"),
    ("model-missing", lambda t: [NO_SCRATCH, "--pretrained_model_name_or_path", str(t / "nope.safetensors")],
     "--pretrained_model_name_or_path"),
    ("no-model", lambda t: [NO_SCRATCH], "Give exactly one of --pretrained_model_name_or_path"),
    ("checkpoint-missing", lambda t: ["--resume_from_checkpoint", str(t / "nope")], "--resume_from_checkpoint"),
    ("config-bad-json", lambda t: ["--config", str(config_file(t, "c.json", "{learning_rate: 1"))], "--config"),
    ("config-wrong-type", lambda t: ["--config", str(config_file(t, "c.yaml", "learning_rate: fast\n"))],
     "--learning_rate 'fast' must be a number"),
    ("config-float-steps", lambda t: ["--config", str(config_file(t, "c.yaml", "lr_warmup_steps: 2.5\n"))],
     "--lr_warmup_steps 2.5 must be an integer"),
    ("config-prompts-not-list", lambda t: ["--config", str(config_file(t, "c.yaml", "validation_prompts: a red\n"))],
     "--validation_prompts 'a red' must be a list of str values"),
    ("config-unknown-key", lambda t: ["--config", str(config_file(t, "c.yaml", "learning_rat: 1\n"))], "learning_rat"),
    ("metadata-bad-json", lambda t: ["--train_data_dir", str(metadata_folder(t, '{"file_name": "a.png",'))],
     "metadata.jsonl line 2 is not valid JSON"),
    ("only-truncated-jpeg", lambda t: ["--train_data_dir", str(truncated_jpeg_folder(t))],
     "has no readable images (1 skipped)"),
    ("scratch-bad-json", lambda t: ["--from_scratch", str(scratch_folder(t, "unet.json", "{bad"))],
     "unet.json is not valid JSON"),
    ("resolution-not-divisible", lambda t: ["--resolution", "33"], "--resolution 33 is not divisible"),
]


@pytest.mark.parametrize("extra, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, extra, expected):
    out, extra = tmp_path / "run", extra(tmp_path)
    drop_scratch = extra[:1] == [NO_SCRATCH]
    argv = args(out, *extra[drop_scratch:])
    if drop_scratch:
        argv = [a for a in argv if a not in ("--from_scratch", str(TINY))]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert expected in stderr, stderr
    assert "Traceback" not in stderr
    assert not out.exists()  # no config.json, logs, tokenizer or checkpoints of a refused run


def test_output_dir_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("my notes")
    with pytest.raises(SystemExit) as exit_info:
        cli(args(out))
    assert exit_info.value.code == 2 and "--output_dir" in capsys.readouterr().err
    assert out.read_text() == "my notes"


def test_resume_past_max_train_steps_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    cli(args(out, "--checkpointing_steps", "2", steps=2))
    written = sorted(out.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli(args(out, "--resume_from_checkpoint", "latest", steps=2))
    assert exit_info.value.code == 2 and "--max_train_steps 2 is not above" in capsys.readouterr().err
    assert sorted(out.rglob("*")) == written


def test_python_dash_m_prints_one_line_and_exits_2(tmp_path):
    """The real command line: no traceback on stderr."""
    import subprocess
    import sys

    from test_train import ENV, REPO

    result = subprocess.run([sys.executable, "-m", "training.train", *args(tmp_path / "run", "--logging_steps", "0")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == "error: --logging_steps 0 must be >= 1."
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from test_train import ENV, REPO

    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "training.train", *args(tmp_path / "run", steps=100000)],
                                   cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr,
                                   # a job started with & in a script inherits SIGINT ignored; undo that
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 240
        while "train:" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    text = log.read_text()
    assert text.strip().splitlines()[-1] == "interrupted" and "Traceback" not in text
