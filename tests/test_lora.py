"""LoRA (and DoRA, LoHa) on the UNet and the text encoder: diffusers and kohya files from one adapter."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import args, fine_tune_args, summary, validation_loss_of

from training.lora_export import DIFFUSERS_FILE, KOHYA_FILE, load_peft
from training.train import main


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny from-scratch model to fine-tune (v-prediction)."""
    return main(args(tmp_path_factory.mktemp("base") / "run", "--prediction_type", "v_prediction"))


fine_tune_args = functools.partial(fine_tune_args, steps=3)


def image(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def with_lora(base, folder, weight_name):
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(folder, weight_name=weight_name)
    return pipe


def adapted_modules(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_unet_and_text_encoder_lora_give_the_same_image_from_diffusers_and_kohya_files(base_model, tmp_path):
    out = tmp_path / "lora-run"
    extra = ["--lora_rank", "4", "--lora_alpha", "2", "--train_text_encoder", "--learning_rate", "1e-2",
             "--text_encoder_lr", "3e-2"]
    lora = main(fine_tune_args(base_model, out, *extra))
    kohya = load_file(lora / KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te"}  # lora_unet_..., lora_te_...
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)  # A1111 names
    alphas = [v.item() for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and set(alphas) == {2.0}  # the adapter's alpha, not the rank
    with safe_open(lora / KOHYA_FILE, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    pipes = {name: with_lora(base_model, lora, name) for name in (DIFFUSERS_FILE, KOHYA_FILE)}
    modules = {prefix: sum(k.startswith(prefix) and k.endswith(".alpha") for k in kohya) for prefix in ("lora_te_", "lora_unet_")}
    assert modules["lora_te_"] == 4  # q, k, v, out of the tiny encoder's one layer
    for pipe in pipes.values():  # both files carry every adapted module of both models
        assert adapted_modules(pipe.text_encoder) == modules["lora_te_"]
        assert adapted_modules(pipe.unet) == modules["lora_unet_"]
    from_diffusers, from_kohya = (image(pipe) for pipe in pipes.values())
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-5)
    assert np.abs(from_diffusers - image(StableDiffusionPipeline.from_pretrained(base_model))).max() > 1e-3
    # The files hold exactly the trained weights: the run's final validation loss, recomputed.
    for pipe in pipes.values():
        assert validation_loss_of(pipe, out) == pytest.approx(summary(out)["final_validation_loss"], rel=1e-4)


def test_unet_dora_saves_for_diffusers(base_model, tmp_path):
    out = tmp_path / "dora"
    lora = main(fine_tune_args(base_model, out, "--lora_rank", "2", "--use_dora", "--lora_format", "diffusers",
                               "--learning_rate", "1e-2"))
    assert any("lora_magnitude_vector" in k for k in load_file(lora / DIFFUSERS_FILE))
    pipe = with_lora(base_model, lora, DIFFUSERS_FILE)
    assert validation_loss_of(pipe, out) == pytest.approx(summary(out)["final_validation_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="--use_dora: diffusers' kohya converter"):
        main(fine_tune_args(base_model, tmp_path / "x", "--lora_rank", "2", "--use_dora"))
    with pytest.raises(ValueError, match="drops a text encoder's DoRA magnitudes"):
        main(fine_tune_args(base_model, tmp_path / "x", "--lora_rank", "2", "--use_dora", "--lora_format",
                            "diffusers", "--train_text_encoder"))


def test_text_encoder_lora_has_its_own_learning_rate(base_model, tmp_path):
    lora = main(fine_tune_args(base_model, tmp_path / "run", "--lora_rank", "2", "--train_text_encoder",
                               "--text_encoder_lr", "0", "--lora_format", "kohya", steps=2))
    assert not (lora / DIFFUSERS_FILE).exists()
    ups = load_file(lora / KOHYA_FILE)
    assert all(not v.any() for k, v in ups.items() if k.startswith("lora_te_") and "lora_up" in k)  # lr 0: still B = 0
    assert any(v.any() for k, v in ups.items() if k.startswith("lora_unet_") and "lora_up" in k)


def test_loha_adapter_trains_saves_and_loads_with_peft(base_model, tmp_path):
    out = tmp_path / "loha"
    lora = main(fine_tune_args(base_model, out, "--lora_rank", "2", "--lora_type", "loha", "--lora_format", "peft",
                               "--train_text_encoder", "--learning_rate", "1e-2"))
    assert {p.name for p in lora.iterdir()} == {"unet", "text_encoder"}
    pipe = StableDiffusionPipeline.from_pretrained(base_model)
    load_peft(pipe.unet, lora / "unet")
    load_peft(pipe.text_encoder, lora / "text_encoder")
    assert validation_loss_of(pipe, out) == pytest.approx(summary(out)["final_validation_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="--lora_format peft"):
        main(fine_tune_args(base_model, tmp_path / "x", "--lora_rank", "2", "--lora_type", "lokr"))
