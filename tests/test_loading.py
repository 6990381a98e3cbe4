"""load_pipeline: folders, errors that name the path, pickle refusal, accelerations (tiny models in tmp folders)."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from ldm_pipeline import LatentTextToImagePipeline, ModelLoadError, load_pipeline, loading
from training.tiny_models import tiny_sd_components, tiny_unet

SMALL = {"width": 32, "height": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "np", "seed": 3}


def save_tiny(folder: Path, safe: bool = True, **replace) -> Path:
    components = {**tiny_sd_components(), **replace}
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(
        str(folder), safe_serialization=safe
    )
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny")


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_loads_a_stable_diffusion_folder(tiny_folder):
    pipe = load_pipeline(tiny_folder, device="cpu")
    assert isinstance(pipe, LatentTextToImagePipeline)
    assert pipe.model_id == str(tiny_folder) and len(pipe.model_hash) == 64
    assert pipe.attention_backend == "sdpa"
    c = tiny_sd_components()
    in_memory = LatentTextToImagePipeline(**{k: c[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    np.testing.assert_allclose(pipe("a red circle", **SMALL).images, in_memory("a red circle", **SMALL).images, atol=1e-6)


def test_saved_pipeline_loads_in_stock_diffusers_too(tiny_folder, tmp_path):
    pipe = load_pipeline(tiny_folder, device="cpu")
    stock = StableDiffusionPipeline.from_pretrained(str(tiny_folder), local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    assert type(stock.scheduler) is type(pipe.scheduler)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope: no such file or folder"):
        load_pipeline(tmp_path / "nope")


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pipeline(tmp_path)


def test_missing_component(tiny_folder, tmp_path):
    broken = shutil.copytree(tiny_folder, tmp_path / "m")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match=r"missing component folder\(s\) vae/"):
        load_pipeline(broken)


def test_pickle_weights_need_the_flag(tmp_path):
    folder = save_tiny(tmp_path / "pickled", safe=False)
    assert list((folder / "unet").glob("*.bin"))
    before = snapshot(folder)
    with pytest.raises(ModelLoadError, match="pickle weights .*allow_pickle=True"):
        load_pipeline(folder)
    assert snapshot(folder) == before
    pipe = load_pipeline(folder, allow_pickle=True)
    assert pipe("a circle", **SMALL).images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name", ["model.ckpt", "MODEL.CKPT", "model.Pth", "model.pickle"])
def test_pickle_single_file_needs_the_flag(tmp_path, name):
    ckpt = tmp_path / name
    torch.save({"state_dict": {}}, ckpt)
    suffix = ckpt.suffix
    with pytest.raises(ModelLoadError, match=rf"{name}: \{suffix} is a pickle format"):
        load_pipeline(ckpt)


def test_a_safetensors_suffix_in_capitals_is_not_taken_for_safetensors(tmp_path):
    odd = tmp_path / "model.SAFETENSORS"  # diffusers would torch.load it: it is not the safetensors format to it
    torch.save({"state_dict": {}}, odd)
    with pytest.raises(ModelLoadError, match=r"unknown model file type '.SAFETENSORS'; expected .safetensors"):
        load_pipeline(odd)


def test_truncated_safetensors_is_named(tiny_folder, tmp_path):
    broken = shutil.copytree(tiny_folder, tmp_path / "m")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = snapshot(broken)
    with pytest.raises(ModelLoadError, match=r"unet/diffusion_pytorch_model.safetensors: corrupt or truncated"):
        load_pipeline(broken)
    assert snapshot(broken) == before


def test_truncated_single_file_is_named(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt or truncated"):
        load_pipeline(file)


def test_weights_that_do_not_fit_the_config(tiny_folder, tmp_path):
    broken = shutil.copytree(tiny_folder, tmp_path / "m")
    donor = tmp_path / "donor"
    tiny_unet(cross_attention_dim=64).save_pretrained(str(donor))
    shutil.copy(donor / "diffusion_pytorch_model.safetensors", broken / "unet")
    with pytest.raises(ModelLoadError, match=r"m: could not load the model"):
        load_pipeline(broken)


def test_components_that_do_not_fit_each_other(tiny_folder, tmp_path):
    broken = shutil.copytree(tiny_folder, tmp_path / "m")
    shutil.rmtree(broken / "unet")
    tiny_unet(cross_attention_dim=64).save_pretrained(str(broken / "unet"))
    with pytest.raises(ModelLoadError, match="attends to 64-dim text features but the text encoder gives 32-dim"):
        load_pipeline(broken)


def test_missing_default_model_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(ModelLoadError, match="embedded default model is missing"):
        load_pipeline()


def test_default_model_loads_and_generates():
    pipe = load_pipeline()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe("a red circle", num_inference_steps=2, progress_bar=False, output_type="np", seed=0)
    assert out.images.shape == (1, size, size, 3)


def test_single_file_without_config_is_explained(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(file))
    with pytest.raises(ModelLoadError, match="pass config=<diffusers folder"):
        load_pipeline(file)


def test_xformers_falls_back_to_sdpa_with_a_reason(tiny_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline.acceleration"):
        pipe = load_pipeline(tiny_folder, device="cpu", xformers=True)
    assert pipe.attention_backend == "sdpa"
    assert "xformers=True ignored" in caplog.text
    reason = "not installed" if "not installed" in caplog.text else "needs a CUDA device"
    assert reason in caplog.text
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe("a circle", **SMALL).images.shape == (1, 32, 32, 3)


def test_cpu_offload_without_cuda_is_logged(tiny_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline.acceleration"):
        load_pipeline(tiny_folder, device="cpu", cpu_offload=True, attention_slicing=True, vae_tiling=True)
    assert "cpu_offload=True ignored" in caplog.text


def test_dtype_and_unknown_options(tiny_folder):
    pipe = load_pipeline(tiny_folder, device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe("a circle", **SMALL).images.shape == (1, 32, 32, 3)
    with pytest.raises(TypeError, match="Unknown load option"):
        load_pipeline(tiny_folder, turbo=True)
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_pipeline(tiny_folder, dtype="fp8")
