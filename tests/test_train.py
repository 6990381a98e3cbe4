"""The training script end to end on tiny from-scratch models (real files, real accelerate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from training import checkpointing, data
from training.config import parse_config
from training.load_and_save import Components
from training.losses import DiffusionLoss
from training.train import build_objective, caption_ids, main, text_encoder_of
from training.validation import VALIDATION_SEED

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "training" / "configs" / "tiny"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU needs mpirun,
# huggingface/accelerate#2741); on a machine without GPUs `--multi_gpu` starts torchrun with 2 gloo processes.
LAUNCH_2 = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train"]


def args(out: Path, *extra: str, steps: int = 2) -> list[str]:
    """A tiny from-scratch run: 32x32 shapes, batch 4, no TensorBoard."""
    return [
        "--from_scratch", str(TINY), "--output_dir", str(out), "--resolution", "32", "--num_train_samples", "16",
        "--num_validation_samples", "4", "--train_batch_size", "4", "--max_train_steps", str(steps),
        "--checkpointing_steps", "1000", "--validation_steps", "1000", "--report_to", "none", "--seed", "3", *extra,
    ]


def as_fine_tune(run_args: list[str], base: Path) -> list[str]:
    """A tiny run's arguments fine-tuning the model `base` instead of building models from scratch."""
    return [a for a in run_args if a not in ("--from_scratch", str(TINY))] + ["--pretrained_model_name_or_path", str(base)]


def fine_tune_args(base: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return as_fine_tune(args(out, *extra, steps=steps), base)


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def recomputed_validation_loss(model_dir: Path, run_dir: Path) -> float:
    """The validation loss of a saved pipeline folder, computed from the files alone."""
    return validation_loss_of(StableDiffusionPipeline.from_pretrained(model_dir), run_dir)


def validation_loss_of(pipe, run_dir: Path) -> float:
    """The validation loss of a pipeline's models (SD or SDXL), as the run `run_dir` computes it."""
    config = parse_config(["--config", str(run_dir / "config.json")])
    sdxl = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2} if hasattr(pipe, "text_encoder_2") else {}
    components = Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config), **sdxl)
    objective, _ = build_objective(config, components)
    sources = data.shapes_validation_sources(config.data.num_validation_samples)
    dataset = data.ImageDataset(sources, data.ImageTransform(config.data.resolution, center_crop=True), 0)
    batch = data.collate([dataset[(i, i)] for i in range(len(dataset))])
    loss = DiffusionLoss(
        pipe.unet, text_encoder_of(components), pipe.vae, objective, caption_ids(components, [s.caption for s in sources]),
        caption_ids(components, [""])[0], 0.0, pipe.vae.config.scaling_factor,
    )
    return loss.fixed_loss(batch, VALIDATION_SEED)


# ---------------------------------------------------------------- configuration


def test_config_file_flags_and_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.003\nsnr_gamma: 5\nvalidation_prompts: [a red circle]\n")
    config = parse_config(["--config", str(tmp_path / "c.yaml"), "--learning_rate", "0.01", "--caption_dropout", "0.2",
                           "--no-center_crop", "--train_text_encoder"])
    assert config.optimization.learning_rate == 0.01  # the flag wins over the file
    assert config.objective.snr_gamma == 5 and config.run.validation_prompts == ["a red circle"]
    assert config.data.proportion_empty_prompts == 0.2 and config.model.train_text_encoder
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(ValueError, match="Unknown option.*learning_rat"):
        parse_config(["--config", str(tmp_path / "bad.json")])
    assert parse_config(["--train_data_dir", "x"]).data.dataset == "folder"


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "training/recipes/shapes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shapes_recipe_configs_are_valid(recipe, capsys):
    """Every stage of the default model's recipe parses and passes the option checks."""
    assert main(["--config", str(recipe), "--dry_run"]) is None
    assert json.loads(capsys.readouterr().out)["data"]["dataset"] == "shapes"


def test_dry_run_prints_config_and_trains_nothing(tmp_path, capsys):
    assert main(args(tmp_path / "run", "--dry_run")) is None
    assert '"learning_rate"' in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--prediction_type", "epsilon", "--zero_terminal_snr"], ValueError, "v_prediction"),
        (["--resolution", "33"], ValueError, "not divisible by the VAE's downsampling factor 2"),
        (["--dataset", "folder", "--train_data_dir", "/nonexistent/images"], FileNotFoundError, "does not exist"),
        (["--lora_rank", "2", "--train_vae"], ValueError, "--train_vae trains only"),
    ],
)
def test_bad_options_fail_with_a_clear_error(tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        main(args(tmp_path / "run", *extra))


# ---------------------------------------------------------------- objectives learn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_each_objective_overfits_a_fixed_batch(prediction_type):
    """Same latents, captions, noise levels and noise every step: the loss must fall by a large factor."""
    from training.load_and_save import scratch_text_encoder, scratch_tokenizer, scratch_unet
    from training.objectives import Objective, build_schedule

    torch.manual_seed(0)
    tokenizer = scratch_tokenizer(data.shapes_vocabulary(), Path(tempfile.mkdtemp()), 16)
    text_encoder = scratch_text_encoder(json.loads((TINY / "text_encoder.json").read_text()), tokenizer)
    unet = scratch_unet(json.loads((TINY / "unet.json").read_text()), 32, 8, 4)
    schedule = build_schedule(prediction_type, "scaled_linear", 1000)
    objective = Objective(schedule, prediction_type, snr_gamma=5.0)
    captions = [s.caption for s in data.shapes_validation_sources(4)]
    loss_fn = DiffusionLoss(unet, text_encoder, None, objective, data.tokenize(tokenizer, captions),
                            data.tokenize(tokenizer, [""])[0], 0.0, 1.0)
    batch = {"latent_mean": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
             "latent_std": torch.zeros(4, 4, 8, 8), "index": torch.arange(4)}
    optimizer = torch.optim.Adam(list(unet.parameters()) + list(text_encoder.parameters()), lr=2e-3)
    losses = []
    for _ in range(60):
        loss, _ = loss_fn(batch, torch.Generator().manual_seed(7))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10, losses[::10]


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    "objective, expected",
    [
        (["--prediction_type", "v_prediction", "--zero_terminal_snr", "--snr_gamma", "5", "--snr_floor", "1"],
         {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
        (["--prediction_type", "epsilon", "--noise_schedule", "cosine", "--noise_offset", "0.05"],
         {"prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": False}),
        (["--prediction_type", "flow", "--timestep_sampling", "logit_normal", "--flow_shift", "2.0"],
         {"prediction_type": "flow", "shift": 2.0, "beta_schedule": "flow"}),
    ],
    ids=["v-ztsnr", "eps-cosine", "flow"],
)
def test_output_folder_loads_in_stock_diffusers_and_ours_with_the_trained_objective(tmp_path, objective, expected):
    import custom_schedulers  # noqa: F401  (a flow model's scheduler class lives here; stock diffusers needs it imported)
    from ldm_pipeline.loading import load_pipeline

    out = tmp_path / "run"
    model = main(args(out, "--train_text_encoder", "--use_ema", *objective))
    assert model == out / "model" and not list(model.rglob("*.bin")) and not list(model.rglob("*.pkl"))
    index = json.loads((model / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert {k: pipe.scheduler.config[k] for k in expected} == expected
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and (image >= 0).all()
    ours = load_pipeline(model, device="cpu")
    assert ours("a red circle", num_inference_steps=2, seed=0, progress_bar=False).images[0].size == (32, 32)
    # The files hold exactly the weights training ended with (EMA copied in).
    assert recomputed_validation_loss(model, out) == pytest.approx(summary(out)["final_validation_loss"], rel=1e-5)


def test_fine_tune_can_change_prediction_type_and_ships_the_new_config(tmp_path):
    base = main(args(tmp_path / "base", "--prediction_type", "epsilon"))
    out = tmp_path / "tuned"
    tuned = main(fine_tune_args(base, out, "--prediction_type", "v_prediction", "--zero_terminal_snr"))
    config = json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    assert json.loads((base / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_vae_mode_saves_vae_with_unit_variance_scaling_factor(tmp_path):
    out = tmp_path / "vae-run"
    vae_dir = main(args(out, "--train_vae", "--learning_rate", "1e-3", steps=3))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    sources = data.shapes_sources(3, 16)
    dataset = data.ImageDataset(sources, data.ImageTransform(32), 3)
    pixels = torch.stack([dataset[(i, i)][0] for i in range(16)])
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    samples = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    scaled_std = (samples * vae.config.scaling_factor).std().item()
    assert 0.9 < scaled_std < 1.1  # unit variance of the latents diffusion trains on (posterior samples)
    # A diffusion run can use it frozen, with cached latents.
    model = main(args(tmp_path / "diff", "--pretrained_vae", str(out), "--cache_latents"))
    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor
    assert list((tmp_path / "diff" / "cache").glob("latents-train-*.safetensors"))


def test_image_folder_run_with_tensorboard_and_validation_images(tmp_path):
    from test_data import write_folder

    folder = tmp_path / "images"
    write_folder(folder, {f"{i}.png": f"a red circle number {i}" for i in range(6)}, metadata=True)
    (folder / "bad.png").write_bytes(b"broken")
    out = tmp_path / "run"
    extra = ["--dataset", "folder", "--train_data_dir", str(folder), "--report_to", "tensorboard",
             "--validation_steps", "2", "--validation_prompts", "a red circle", "--validation_inference_steps", "2",
             "--logging_steps", "1"]
    main(args(out, *extra))
    assert (out / "validation" / "step-0000002.png").is_file()
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["images"])
    assert {"train/loss", "train/lr", "train/grad_norm", "validation/loss", "validation"} <= tags


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    main(args(plain, "--train_text_encoder", steps=3))
    main(args(checkpointed, "--train_text_encoder", "--gradient_checkpointing", steps=3))
    ours = [loss for _, loss in summary(checkpointed)["loss_history"]]
    assert ours == pytest.approx([loss for _, loss in summary(plain)["loss_history"]], rel=1e-5)


def test_test_run_stops_after_one_step_and_saves(tmp_path):
    model = main(args(tmp_path / "run", "--test_run", steps=50))
    assert summary(tmp_path / "run")["steps"] == 1 and (model / "model_index.json").is_file()


@pytest.mark.slow
def test_bf16_mixed_precision_trains(tmp_path):
    """In a subprocess: accelerate's mixed-precision state is per process."""
    out = tmp_path / "bf16"
    command = [sys.executable, "-m", "training.train", *args(out, "--mixed_precision", "bf16", "--train_text_encoder", steps=3)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [loss for _, loss in summary(out)["loss_history"]]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    assert StableDiffusionPipeline.from_pretrained(out / "model").unet.dtype == torch.float32  # weights stay fp32


# ---------------------------------------------------------------- LoRA


def test_lora_weights_load_with_load_lora_weights(tmp_path):
    base = main(args(tmp_path / "base", "--prediction_type", "v_prediction"))
    out = tmp_path / "lora-run"
    lora = main(fine_tune_args(base, out, "--lora_rank", "4", "--learning_rate", "1e-2"))
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(base)
    before = recomputed_validation_loss(base, out)
    pipe.load_lora_weights(lora)
    tuned_dir = tmp_path / "merged"
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tuned_dir)
    after = recomputed_validation_loss(tuned_dir, out)
    assert after == pytest.approx(summary(out)["final_validation_loss"], rel=1e-4)
    assert after != pytest.approx(before, rel=1e-4)


# ---------------------------------------------------------------- resume and checkpoints


@pytest.mark.parametrize("data_path", [["--random_flip"], ["--cache_latents"]], ids=["pixels-flip", "cached-latents"])
def test_resume_equals_uninterrupted(tmp_path, data_path):
    extra = ["--train_text_encoder", "--use_ema", "--gradient_accumulation_steps", "2", "--snr_gamma", "5",
             "--checkpointing_steps", "3", "--lr_scheduler", "constant", "--learning_rate", "1e-3",
             "--prediction_type", "v_prediction", "--noise_offset", "0.1", *data_path]
    full = tmp_path / "full"
    main(args(full, *extra, steps=6))
    parted = tmp_path / "parted"
    main(args(parted, *extra, steps=3))
    assert [p.name for p in checkpointing.list_checkpoints(parted)] == ["checkpoint-3"]
    main(args(parted, *extra, "--resume_from_checkpoint", "latest", steps=6))
    expected = summary(full)["loss_history"][3:]
    assert summary(parted)["loss_history"] == expected  # steps 4..6, bit for bit
    assert summary(parted)["final_validation_loss"] == summary(full)["final_validation_loss"]


def test_checkpoints_keep_the_last_k(tmp_path):
    out = tmp_path / "run"
    main(args(out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", steps=4))
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_leaves_a_loadable_latest_checkpoint(tmp_path):
    """SIGKILL the moment a checkpoint's temporary folder appears; every published checkpoint stays complete."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training.train", *args(out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "100", steps=400)]
    interrupted = False
    for _ in range(3):
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            tmp = list((out / "checkpoints").glob(".tmp-checkpoint-*")) if (out / "checkpoints").is_dir() else []
            if tmp and checkpointing.list_checkpoints(out):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait()
        interrupted = list((out / "checkpoints").glob(".tmp-checkpoint-*")) != []
        if interrupted:
            break
    assert interrupted, "the kill never landed during a checkpoint write"
    found = checkpointing.list_checkpoints(out)
    assert found
    for checkpoint in found:  # every published checkpoint is complete
        assert {"model.safetensors", "optimizer.safetensors", checkpointing.STATE_FILE} <= {p.name for p in checkpoint.iterdir()}
        assert checkpointing.damage(checkpoint) is None
    latest = checkpointing.read_state(found[-1])["step"]
    resumed = main(args(out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "1", steps=latest + 1))
    assert summary(out)["loss_history"][0][0] == latest + 1 and resumed.is_dir()
    assert not list((out / "checkpoints").glob(".tmp-checkpoint-*"))  # the stale temporary folder is cleaned up


@pytest.mark.slow
def test_accelerate_launch_two_processes_ddp(tmp_path):
    out = tmp_path / "ddp"
    command = [*LAUNCH_2, *args(out, "--checkpointing_steps", "2", "--train_text_encoder")]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training distributed (gloo) over 2 processes" in result.stderr
    assert "All 2 processes hold identical weights" in result.stderr  # gradients were all-reduced
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "random_states_0.safetensors").is_file() and (checkpoint / "random_states_1.safetensors").is_file()
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-2"]
    StableDiffusionPipeline.from_pretrained(out / "model")
    # Both ranks agree: the logged loss is the mean over ranks, identical in each process's view.
    assert summary(out)["steps"] == 2


def test_fine_tune_from_a_single_safetensors_file(tmp_path):
    from diffusers import StableDiffusionPipeline as Stock

    from tests.test_loading_single_file import write_single_file_model
    from training.tiny_models import tiny_sd_components

    components = tiny_sd_components()
    file, config_dir = write_single_file_model(tmp_path, components)
    model = main(fine_tune_args(file, tmp_path / "run", "--prediction_type", "v_prediction", "--single_file_config",
                                str(config_dir)))
    tuned = Stock.from_pretrained(model)
    assert tuned.scheduler.config.prediction_type == "v_prediction"
    assert list(tuned.unet.config.block_out_channels) == list(components["unet"].config.block_out_channels)
