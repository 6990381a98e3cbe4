"""Textual inversion: only the new token's embedding changes; diffusers and A1111 files give the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_lora import base_model, fine_tune_args, image  # noqa: F401  (base_model is a fixture)
from test_train import summary

from training.textual_inversion import DIFFUSERS_FILE, expand_placeholder
from training.train import main


def test_only_the_new_embedding_trains_and_both_files_load(base_model, tmp_path):  # noqa: F811
    from test_data import write_folder

    folder = tmp_path / "images"
    write_folder(folder, {f"{i}.png": "ignored" for i in range(3)}, metadata=False)
    out = tmp_path / "ti"
    saved = main(fine_tune_args(base_model, out, "--train_data_dir", str(folder), "--num_validation_samples", "1",
                                "--placeholder_token", "<sks>", "--initializer_token", "circle", "--num_vectors", "2",
                                "--instance_prompt", "a red <sks>", "--learning_rate", "5e-2",
                                "--adam_weight_decay", "0.1", steps=3))
    learned = load_file(saved / DIFFUSERS_FILE)["<sks>"]
    assert learned.shape == (2, 32) and torch.equal(load_file(saved / "sks.safetensors")["emb_params"], learned)
    base = StableDiffusionPipeline.from_pretrained(base_model)
    start = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("circle")]
    assert not torch.allclose(learned, start.expand(2, -1))  # trained away from the initializer
    pipes = []
    for file, token in ((DIFFUSERS_FILE, None), ("sks.safetensors", "<sks>")):
        pipe = StableDiffusionPipeline.from_pretrained(base_model)
        pipe.load_textual_inversion(saved / file, token=token)
        old_rows = pipe.text_encoder.get_input_embeddings().weight[: len(base.tokenizer)]
        assert torch.equal(old_rows, base.text_encoder.get_input_embeddings().weight)  # nothing else changed
        pipes.append(pipe)
    prompt = "a red <sks>"
    images = [p(prompt, num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0] for p in pipes]
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)
    assert summary(out)["steps"] == 3


def test_placeholder_expansion_and_errors(base_model, tmp_path):  # noqa: F811
    assert expand_placeholder("a <sks> dog", "<sks>", 3) == "a <sks> <sks>_1 <sks>_2 dog"
    with pytest.raises(ValueError, match="needs --initializer_token"):
        main(fine_tune_args(base_model, tmp_path / "x", "--placeholder_token", "<sks>"))
    with pytest.raises(ValueError, match="already in the tokenizer"):
        main(fine_tune_args(base_model, tmp_path / "y", "--placeholder_token", "circle", "--initializer_token", "red"))


def test_training_changes_only_the_new_rows():
    from training.config import OptimizationOptions
    from training.optimizers import build_optimizer
    from training.textual_inversion import add_placeholder, train_only_rows
    from training.tiny_models import tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    encoder = tiny_text_encoder(len(tokenizer))
    ids = add_placeholder(tokenizer, encoder, "<cat-toy>", "circle", 2)
    train_only_rows(encoder, ids)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    for name in ("adamw", "lion", "prodigy"):
        optimizer = build_optimizer(name, [{"params": trainable, "weight_decay": 0.0}],
                                    OptimizationOptions(learning_rate=1.0 if name == "prodigy" else 1e-2))
        for _ in range(2):
            text = tokenizer(["a red <cat-toy> <cat-toy>_1 circle"], return_tensors="pt").input_ids
            encoder(text).last_hidden_state.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for name, value in encoder.named_parameters():
        if name.endswith("token_embedding.weight"):
            old = [i for i in range(value.shape[0]) if i not in ids]
            assert torch.equal(value[old], before[name][old]) and not torch.equal(value[ids], before[name][ids])
        else:
            assert torch.equal(value, before[name]), name
