"""ldm-generate --lora / --lora-dir with <lora:NAME:W> / --embedding: images, recipes and A1111 hashes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from ldm_pipeline import load_pipeline, metadata
from ldm_pipeline.generate import main
from tests.test_lora_loading import write_lora
from training.lora_export import KOHYA_FILE
from training.tiny_models import tiny_sd_components

RUN = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-lora")
    model = root / "model"
    StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False).save_pretrained(str(model))
    loras = root / "loras"
    loras.mkdir()
    shutil.copy(write_lora(root / "trained", seed=1) / KOHYA_FILE, loras / "style.safetensors")
    embedding = root / "zorblax.safetensors"
    save_file({"<x>": torch.randn(32, generator=torch.Generator().manual_seed(4))}, str(embedding))
    return model, loras, embedding


def generate(model: Path, out: Path, prompt: str, *extra: str) -> int:
    return main([prompt, "--model", str(model), "--out", str(out), *RUN, *extra])


def image(out: Path) -> np.ndarray:
    return np.asarray(Image.open(out / "00000_000.png")).astype(int)


def kohya_hash(path: Path) -> str:
    """kohya/AddNet's hash, as A1111 computes it: sha256 of the bytes after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_lora_flag_and_prompt_tag_give_the_pipelines_image_and_record_the_hash(files, tmp_path):
    model, loras, _ = files
    lora = loras / "style.safetensors"
    assert generate(model, tmp_path / "flag", "a red circle", "--lora", f"{lora}:0.6") == 0
    assert generate(model, tmp_path / "tag", "a red circle <lora:style:0.6>", "--lora-dir", str(loras)) == 0
    assert generate(model, tmp_path / "base", "a red circle") == 0
    pipe = load_pipeline(str(model))
    pipe.load_lora_weights(str(lora))
    expected = pipe("a red circle", width=32, height=32, num_inference_steps=2, seed=3, output_type="np",
                    cross_attention_kwargs={"scale": 0.6}, progress_bar=False).images[0]
    assert np.abs(image(tmp_path / "flag") - np.round(expected * 255)).max() <= 1
    assert np.array_equal(image(tmp_path / "tag"), image(tmp_path / "flag"))
    assert np.abs(image(tmp_path / "tag") - image(tmp_path / "base")).max() > 2
    png = metadata.read_png(tmp_path / "tag" / "00000_000.png")
    assert png.recipe["prompt"] == "a red circle"  # the tag is not encoded
    assert png.recipe["loras"] == [{"name": "style", "hash": kohya_hash(lora), "scale": 0.6}]
    assert kohya_hash(lora) != hashlib.sha256(lora.read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "style: {kohya_hash(lora)}"' in png.parameters_text
    assert png.parameters_text.startswith("a red circle <lora:style:0.6>\n")  # as A1111 writes its prompt
    chunks = png.parameters_text + json.dumps(png.recipe)
    assert str(loras) not in chunks and str(lora) not in chunks  # names and hashes, never the server's paths
    assert "loras" not in metadata.read_png(tmp_path / "base" / "00000_000.png").recipe


@pytest.mark.parametrize("tag, message", [
    ("<lora:../style:1>", "without '/', '\\\\' or '..'"),
    ("<lora:sub/style>", "without '/'"),
    ("<lora:nope:0.5>", "no such LoRA in .*; available: style"),
    ("<lora:style:heavy>", "the weight must be a number"),
])
def test_bad_lora_tags_are_refused_with_the_fix(files, tmp_path, capsys, tag, message):
    model, loras, _ = files
    assert generate(model, tmp_path, f"a red circle {tag}", "--lora-dir", str(loras)) == 1
    assert not list(tmp_path.glob("*.png"))

    assert re.search(message, capsys.readouterr().err)


def test_tag_without_lora_dir_says_to_pass_it(files, tmp_path, capsys):
    model, _, _ = files
    assert generate(model, tmp_path, "a red circle <lora:style>") == 1
    assert "pass --lora-dir DIR" in capsys.readouterr().err


def test_embedding_changes_the_image_only_where_its_token_is_used(files, tmp_path):
    model, _, embedding = files
    assert generate(model, tmp_path / "plain", "a red circle", "--embedding", str(embedding)) == 0
    assert generate(model, tmp_path / "base", "a red circle") == 0
    assert generate(model, tmp_path / "used", "a red zorblax", "--embedding", str(embedding)) == 0
    assert np.array_equal(image(tmp_path / "plain"), image(tmp_path / "base"))
    assert np.abs(image(tmp_path / "used") - image(tmp_path / "base")).max() > 2
    png = metadata.read_png(tmp_path / "used" / "00000_000.png")
    digest = hashlib.sha256(embedding.read_bytes()).hexdigest()[:12]
    assert png.recipe["embeddings"] == [{"name": "zorblax", "hash": digest}]
    assert f'TI hashes: "zorblax: {digest}"' in png.parameters_text


def test_pickle_lora_needs_allow_pickle(files, tmp_path, capsys):
    model, loras, _ = files
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"not read")
    assert generate(model, tmp_path / "out", "a red circle", "--lora", str(pickled)) == 2
    assert "old.pt is a pickle file" in capsys.readouterr().err


def test_lines_without_a_tag_run_without_the_lora(files, tmp_path):
    model, loras, _ = files
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle <lora:style:0.6>\na red circle\n")
    assert main(["--prompts", str(prompts), "--model", str(model), "--out", str(tmp_path / "both"), *RUN,
                 "--lora-dir", str(loras)]) == 0
    assert generate(model, tmp_path / "base", "a red circle", "--seed", "10003") == 0  # line 2's seed
    assert np.array_equal(np.asarray(Image.open(tmp_path / "both" / "00001_000.png")), image(tmp_path / "base"))
    assert "loras" not in metadata.read_png(tmp_path / "both" / "00001_000.png").recipe
