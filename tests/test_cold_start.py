"""Cold start of `ldm-generate`: it imports only what its job needs, and its default backend (`auto`) runs
ONNX Runtime where that is faster for one image. Timings are in `benchmarks/cold_start.py`, never here."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle on a blue background at the top left"
# packages a one-image command does not need: the UI, plots, training, LoRA (peft), quantizers, and on the
# ONNX path diffusers' pipelines and models and transformers (the bulk of a cold start)
NEVER = ("gradio", "matplotlib", "training", "peft", "bitsandbytes", "evaluation", "onnx")
ONNX_PATH_NEVER = NEVER + ("transformers", "diffusers.pipelines", "diffusers.models", "diffusers.loaders")

LIST_MODULES = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def imported(code: str, tmp_path: Path) -> set[str]:
    """The modules a fresh interpreter has imported after running `code` (which ends by printing them)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for p in packages if m == p or m.startswith(p + "."))


def test_importing_the_generate_command_imports_no_ui_training_lora_or_diffusers_pipelines(tmp_path):
    modules = imported(f"import ldm_pipeline.generate; {LIST_MODULES}", tmp_path)
    assert loaded(modules, ONNX_PATH_NEVER) == []


def test_the_library_api_still_imports_from_the_package(tmp_path):
    code = ("from ldm_pipeline import GenerationOptions, LatentTextToImagePipeline, load_pipeline, swap_scheduler; "
            "from ldm_pipeline.pipeline import LatentTextToImagePipeline as P; "
            "from diffusers import DiffusionPipeline; "
            "assert P is LatentTextToImagePipeline and issubclass(P, DiffusionPipeline); " + LIST_MODULES)
    assert "diffusers.pipelines.pipeline_utils" in imported(code, tmp_path)


def run_generate(args: list[str]) -> str:
    """`ldm-generate ARGS` in this process' interpreter, then the modules it imported."""
    return (f"from ldm_pipeline.generate import main; assert main({args!r}) == 0; " + LIST_MODULES)


def pixels(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "00000_000.png")).astype(int)


@pytest.mark.slow
def test_the_default_command_exports_once_then_runs_onnx_without_diffusers_models(tmp_path):
    pytest.importorskip("onnxruntime")
    from ldm_pipeline import metadata
    from ldm_pipeline.onnx_backend import EXPORT_RECORD, cache_root

    args = [PROMPT, "--seed", "3", "--n", "2"]
    imported(run_generate([*args, "--out", str(tmp_path / "first")]), tmp_path)  # exports on first use
    exports = list(cache_root().iterdir())  # the session's cache (conftest)
    assert [p.name for p in exports if p.name.startswith(".")] == []  # no temporary folder left behind
    assert any((p / EXPORT_RECORD).is_file() for p in exports)
    modules = imported(run_generate([*args, "--out", str(tmp_path / "cached")]), tmp_path)
    assert loaded(modules, ONNX_PATH_NEVER) == []
    imported(run_generate([*args, "--out", str(tmp_path / "pytorch"), "--backend", "pytorch"]), tmp_path)
    for run in ("first", "cached"):  # same pixels within the stated tolerance, same recipe but the backend
        assert np.abs(pixels(tmp_path / run) - pixels(tmp_path / "pytorch")).max() <= 1
        ours = metadata.read_png(tmp_path / run / "00000_000.png").recipe
        reference = metadata.read_png(tmp_path / "pytorch" / "00000_000.png").recipe
        assert (ours.pop("backend"), reference.pop("backend")) == ("onnx", "pytorch")
        ours["versions"].pop("onnxruntime")
        assert ours == reference


def test_the_auto_backend_takes_onnx_only_where_it_pays(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from ldm_pipeline.onnx_backend import cache_folder, one_shot_backend
    from ldm_pipeline.onnx_export import export_onnx

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    assert one_shot_backend(None, device="cpu") == "onnx"  # the embedded model: exported on first use
    assert one_shot_backend(None, device="cpu", pytorch_only=True) == "pytorch"  # --lora, --trace, ...
    assert one_shot_backend(None, device="cpu", dtype="fp16") == "pytorch"
    assert one_shot_backend(None, device="meta") == "pytorch"  # not the CPU
    assert one_shot_backend(tiny_model_dir, device="cpu") == "pytorch"  # another model, not exported yet
    export_onnx(tiny_model_dir, cache_folder(tiny_model_dir))
    assert one_shot_backend(tiny_model_dir, device="cpu") == "onnx"
    assert one_shot_backend(cache_folder(tiny_model_dir), device="cpu") == "onnx"  # an export folder


TEXTS = ["a large red circle on a blue background at the top left", "A  Large RED circle!!  (blue:1.3)",
         "an unknownword and punctuation, commas; e\u0301t\u00e9 \u2014 <|endoftext|> end", "",
         " ".join(["red circle"] * 60)]


@pytest.mark.parametrize("which", ["embedded", "tiny"])
def test_the_json_tokenizer_gives_clip_tokenizers_ids(which, tmp_path):
    from transformers import CLIPTokenizer

    from ldm_pipeline.clip_tokenizer import ClipTokenizerJson, load_tokenizer
    from ldm_pipeline.loading import DEFAULT_MODEL_DIR
    from training.tiny_models import tiny_tokenizer

    if which == "embedded":
        folder = DEFAULT_MODEL_DIR / "tokenizer"
    else:
        folder = tmp_path / "tokenizer"
        tiny_tokenizer().save_pretrained(folder)
    reference = CLIPTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder, "transformers", "CLIPTokenizer")
    assert isinstance(ours, ClipTokenizerJson)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "model_max_length"):
        assert getattr(ours, name) == getattr(reference, name)
    assert len(ours) == len(reference)
    for text in TEXTS:
        for special in (False, True):
            expected = reference(text, add_special_tokens=special, truncation=False, verbose=False).input_ids
            assert ours(text, add_special_tokens=special).input_ids == expected
    assert copy.deepcopy(ours)(TEXTS[0]).input_ids == ours(TEXTS[0]).input_ids  # the app copies it per request


def test_a_folder_without_tokenizer_json_keeps_transformers(tmp_path):
    from transformers import CLIPTokenizer

    from ldm_pipeline.clip_tokenizer import load_tokenizer
    from training.tiny_models import tiny_tokenizer

    folder = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    assert isinstance(load_tokenizer(folder, "transformers", "CLIPTokenizer"), CLIPTokenizer)
