"""Fine-tuning SDXL with the training script: tiny SDXL components (as diffusers' own SDXL tests build them),
real files, real accelerate, outputs loaded by stock `StableDiffusionXLPipeline`."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
from test_buckets import bucket_run_args, write_mixed_folder
from test_train import ENV, LAUNCH_2, REPO, as_fine_tune, fine_tune_args, summary, validation_loss_of

from training import checkpointing, data
from training.lora_export import DIFFUSERS_FILE, KOHYA_FILE
from training.sdxl import SDXLTextEncoders, added_conditioning, text_embedding_cache
from training.tiny_models import tiny_sdxl_components
from training.train import cli, main

RESUMABLE = ("--checkpointing_steps", "2", "--lr_scheduler", "constant", "--learning_rate", "1e-3",
             "--prediction_type", "v_prediction", "--snr_gamma", "5")


def image(pipe) -> np.ndarray:
    """Stock diffusers' image (guidance 5, the SDXL default) of one prompt and seed."""
    return pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np", guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0)).images[0]


# ---------------------------------------------------------------- conditioning equals stock SDXL's


def test_conditioning_matches_stock_encode_prompt_and_time_ids():
    """Both encoders' penultimate states concatenated, pooled from text_encoder_2, (original, crop, target) ids."""
    components = tiny_sdxl_components()
    stock = StableDiffusionXLPipeline(**components)
    embeds, _, pooled, _ = stock.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    ids = data.tokenize((components["tokenizer"], components["tokenizer_2"]), ["a red circle"])
    with torch.no_grad():
        ours, ours_pooled = SDXLTextEncoders(components["text_encoder"], components["text_encoder_2"])(ids)
    torch.testing.assert_close(ours, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=1e-6)
    batch = {"original_size": torch.tensor([[48, 40]]), "crop_top_left": torch.tensor([[4, 8]]),
             "target_size": torch.tensor([[32, 24]])}
    expected = stock._get_add_time_ids((48, 40), (4, 8), (32, 24), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(added_conditioning(pooled, batch)["time_ids"], expected)


def test_cached_text_embeddings_equal_the_encoders(tmp_path):
    from accelerate import Accelerator

    from training.load_and_save import Components

    c = tiny_sdxl_components()
    components = Components(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], {}, c["text_encoder_2"],
                            c["tokenizer_2"])
    captions = ["a red circle", "a blue square", "a red circle"]
    cached, rows, empty = text_embedding_cache(Accelerator(cpu=True), components, captions, tmp_path)
    assert rows.tolist() == [2, 1, 2] and empty.item() == 0  # distinct captions, sorted, "" first
    assert len(list(tmp_path.glob("text-embeddings-*.safetensors"))) == 1
    live = SDXLTextEncoders(c["text_encoder"], c["text_encoder_2"])
    with torch.no_grad():
        for got, expected in zip(cached(torch.cat([rows, empty[None]])), live(data.tokenize(components.tokenizers, captions + [""]))):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- outputs


def test_output_loads_in_stock_and_ours_with_v_prediction_and_zero_terminal_snr(tiny_sdxl_model_dir, tmp_path):
    from ldm_pipeline.loading import load_pipeline
    from ldm_pipeline.sdxl import LatentSDXLPipeline

    out = tmp_path / "run"
    model = main(fine_tune_args(tiny_sdxl_model_dir, out, "--train_text_encoder", "--use_ema", "--prediction_type",
                                "v_prediction", "--zero_terminal_snr", "--snr_gamma", "5", "--snr_floor", "1",
                                "--validation_steps", "2", "--validation_prompts", "a red circle",
                                "--validation_inference_steps", "2"))
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert not [p for p in model.rglob("*") if p.suffix in (".bin", ".pkl", ".ckpt")]
    assert (out / "validation" / "step-0000002.png").is_file()  # sampled by our SDXL pipeline
    stock = StableDiffusionXLPipeline.from_pretrained(model)
    expected = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert {k: stock.scheduler.config[k] for k in expected} == expected
    assert image(stock).shape == (32, 32, 3)
    ours = load_pipeline(model, device="cpu")
    assert isinstance(ours, LatentSDXLPipeline)
    assert ours("a red circle", num_inference_steps=2, seed=0, width=32, height=32,
                progress_bar=False).images[0].size == (32, 32)
    # The files hold the weights training ended with (EMA copied in), both text encoders included.
    assert validation_loss_of(stock, out) == pytest.approx(summary(out)["final_validation_loss"], rel=1e-5)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    unused = stock.text_encoder.final_layer_norm.weight  # SDXL reads the penultimate layer: frozen, unchanged
    assert torch.equal(unused, base.text_encoder.final_layer_norm.weight)
    for name in ("text_encoder", "text_encoder_2"):
        trained, before = (getattr(p, name).get_input_embeddings().weight for p in (stock, base))
        assert not torch.equal(trained, before), name


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_model_dir, tmp_path_factory):
    """(lora folder, run folder) of a LoRA on the UNet and both text encoders of the tiny SDXL model."""
    out = tmp_path_factory.mktemp("sdxl-lora") / "run"
    return main(fine_tune_args(tiny_sdxl_model_dir, out, "--lora_rank", "4", "--lora_alpha", "2",
                               "--train_text_encoder", "--learning_rate", "1e-2", steps=3)), out


def test_lora_loads_in_stock_from_the_diffusers_and_kohya_files(tiny_sdxl_model_dir, lora_run):
    lora, out = lora_run
    kohya = load_file(lora / KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}  # SDXL's kohya prefixes
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    images = []
    for weight_name in (DIFFUSERS_FILE, KOHYA_FILE):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
        pipe.load_lora_weights(lora, weight_name=weight_name)
        # the trained adapters of all three models, exactly: the run's final validation loss, recomputed
        assert validation_loss_of(pipe, out) == pytest.approx(summary(out)["final_validation_loss"], rel=1e-4)
        images.append(image(pipe))
    np.testing.assert_allclose(images[1], images[0], atol=1e-5)
    assert np.abs(images[0] - image(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir))).max() > 1e-3


def test_lora_gives_the_same_image_in_ours_and_stock(tiny_sdxl_model_dir, lora_run):
    from ldm_pipeline.sdxl import LatentSDXLPipeline

    stock, ours = (cls.from_pretrained(tiny_sdxl_model_dir) for cls in (StableDiffusionXLPipeline, LatentSDXLPipeline))
    for pipe in (stock, ours):
        pipe.load_lora_weights(lora_run[0], weight_name=DIFFUSERS_FILE)
    got = ours("a red circle", num_inference_steps=3, height=32, width=32, output_type="np", seed=0,
               guidance_scale=5.0, guidance_rescale=0.0, progress_bar=False).images[0]
    np.testing.assert_allclose(got, image(stock), atol=1e-5)


def test_textual_inversion_is_refused_for_sdxl(tiny_sdxl_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli(fine_tune_args(tiny_sdxl_model_dir, out, "--placeholder_token", "<sks>", "--initializer_token", "red"))
    assert exit_info.value.code == 2 and "SDXL needs a vector for each of its two encoders" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- resume


def resumable_run(base, tmp_path, data_path: str):
    """A run function (out, *flags, steps) for one data path (see `test_resume_equals_uninterrupted`)."""
    if data_path == "pixels":
        extra = [*RESUMABLE, "--train_text_encoder", "--use_ema", "--gradient_accumulation_steps", "2", "--random_flip"]
        return lambda out, *more, steps: main(fine_tune_args(base, out, *extra, *more, steps=steps))
    if data_path == "buckets-cached":
        write_mixed_folder(tmp_path / "images")
        return lambda out, *more, steps: main(as_fine_tune(bucket_run_args(
            tmp_path / "images", out, *RESUMABLE, "--cache_latents", *more, steps=steps), base))
    from test_shards import shard_run_args, write_shards  # skips if webdataset (the [train] extra) is missing

    patterns = write_shards(tmp_path / "shards")
    return lambda out, *more, steps: main(as_fine_tune(shard_run_args(patterns, out, *RESUMABLE, *more, steps=steps), base))


@pytest.mark.parametrize("data_path", ["pixels", "buckets-cached", "shards"])
def test_resume_equals_uninterrupted(tiny_sdxl_model_dir, tmp_path, data_path):
    """Pixels with trained text encoders, EMA and accumulation; bucketed folder images with cached latents,
    cached text embeddings (frozen encoders) and each image's size conditioning in the cache; or streamed,
    bucketed WebDataset shards with shuffled tags (both tokenizers per step)."""
    run = resumable_run(tiny_sdxl_model_dir, tmp_path, data_path)
    run(tmp_path / "full", steps=4)
    run(tmp_path / "parted", steps=2)
    run(tmp_path / "parted", "--resume_from_checkpoint", "latest", steps=4)
    assert summary(tmp_path / "parted")["loss_history"] == summary(tmp_path / "full")["loss_history"][2:]
    assert summary(tmp_path / "parted")["final_validation_loss"] == summary(tmp_path / "full")["final_validation_loss"]
    if data_path == "buckets-cached":
        cache = tmp_path / "full" / "cache"
        assert len(list(cache.glob("text-embeddings-*.safetensors"))) == 1
        [latents] = cache.glob("latents-train-*.safetensors")
        sizes = load_file(latents)
        assert sizes["original_size"].shape == (8, 2) and sizes["target_size"].shape == (8, 2)
        assert {tuple(s) for s in sizes["target_size"].tolist()} != {(32, 32)}  # the buckets' sizes


@pytest.mark.slow
def test_two_process_training_and_resume(tiny_sdxl_model_dir, tmp_path):
    """Real `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU): both text encoders trained."""
    full, parted = tmp_path / "full", tmp_path / "parted"
    extra = [*RESUMABLE, "--train_text_encoder", "--use_ema"]
    for command in ([*LAUNCH_2, *fine_tune_args(tiny_sdxl_model_dir, full, *extra, steps=4)],
                    [*LAUNCH_2, *fine_tune_args(tiny_sdxl_model_dir, parted, *extra, "--resume_from_checkpoint",
                                                str(full / "checkpoints/checkpoint-2"), steps=4)]):
        result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "Training distributed (gloo) over 2 processes" in result.stderr
        assert "All 2 processes hold identical weights" in result.stderr  # gradients were all-reduced
    checkpoint = full / "checkpoints" / "checkpoint-2"
    assert {"model_2.safetensors", "random_states_1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not checkpointing.pickle_files(checkpoint)
    assert summary(parted)["loss_history"] == summary(full)["loss_history"][2:]
    assert summary(parted)["final_validation_loss"] == summary(full)["final_validation_loss"]
    assert image(StableDiffusionXLPipeline.from_pretrained(full / "model")).shape == (32, 32, 3)
