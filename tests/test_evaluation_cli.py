"""`ldm-evaluate` end to end on the tiny test model, the CLIP score on a tiny local CLIP, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from evaluation import metrics
from evaluation.adherence import evaluation_combinations
from evaluation.cli import main
from evaluation.quality import real_images
from training.tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A seeded, untrained CLIP of the shapes vocabulary, saved as a transformers folder with its processor."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(2)  # a seed whose mean image-prompt cosine is positive, so the score is not clamped to 0
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_with_a_local_folder_matches_transformers(tiny_clip_dir):
    combos = evaluation_combinations(4)["seen"]
    images, prompts = real_images(combos, 1), [a.caption() for a in combos]
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=list(images), return_tensors="pt")).pooler_output
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True)).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    expected = max(100 * float(cosine.mean()), 0.0)  # Hessel et al. 2021 with w = 100, torchmetrics' convention
    assert expected > 1.0
    assert metrics.clip_score(tiny_clip_dir, images, prompts) == pytest.approx(expected, rel=1e-4)


def test_ldm_evaluate_prints_scores_and_the_judge_table(tiny_model_dir, tiny_clip_dir):
    command = [sys.executable, "-m", "evaluation", "--model", str(tiny_model_dir), "--per-split", "4",
               "--steps", "2", "--guidance", "2", "--batch-size", "8", "--clip", str(tiny_clip_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "DDIMScheduler, 2 steps, guidance 2.0" in out
    assert "| images | n | FID | IS | precision | recall |" in out
    generated = next(line for line in out.splitlines() if line.startswith("| generated | 8 |"))
    floor = next(line for line in out.splitlines() if line.startswith("| real, independent draw (noise floor) | 8 |"))
    assert float(generated.split("|")[3]) > 10 * float(floor.split("|")[3])  # an untrained model vs the noise floor
    assert "CLIP score (prompt vs image):" in out
    assert "| seen | 4 |" in out and "| held_out | 4 |" in out and "all (strict)" in out
    assert "generating: 100%" in result.stderr  # the progress bar


@pytest.mark.parametrize("flag, message", [
    ("--inception-weights", "No Inception weights at .*pt_inception"),
    ("--clip", "No CLIP model at"),
    ("--features", "No shapes feature network at"),
])
def test_ldm_evaluate_names_a_missing_local_file_before_generating(tmp_path, flag, message):
    with pytest.raises(SystemExit, match=message):
        main(["--model", str(tmp_path / "no-model"), flag, str(tmp_path / "missing"), "--per-split", "4"])


@pytest.mark.parametrize("count", ["3", "169"])
def test_ldm_evaluate_refuses_a_prompt_count_it_cannot_draw(count):
    with pytest.raises(SystemExit, match=r"--per-split must be 4\.\.168"):
        main(["--per-split", count])
