"""ONNX export and the ONNX Runtime backend: per-graph parity with PyTorch, the same images and recipes
through `ldm-generate --backend onnx`, the export cache, and the errors (missing extra, wrong options)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")

from ldm_pipeline import ModelLoadError, load_pipeline, metadata  # noqa: E402
from ldm_pipeline.generate import main as generate  # noqa: E402
from ldm_pipeline.onnx_backend import EXPORT_RECORD, OnnxGraph, optimized_path, save_optimized  # noqa: E402
from ldm_pipeline.onnx_export import ATOL, RTOL, export_onnx  # noqa: E402
from ldm_pipeline.onnx_export import main as export_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on a blue background at the top left"
PIXEL_TOLERANCE = 1  # 8-bit levels: the README's stated tolerance between the backends


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    checks = export_onnx(tiny_model_dir, out)
    assert all(c.ok for c in checks) and len(checks) == 5
    return out


@pytest.fixture(scope="module")
def embedded_onnx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "embedded"
    assert export_cli(["default", str(out)]) == 0
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def check_components(torch_pipe, onnx_pipe, seed: int = 0) -> None:
    """Each adapter against its PyTorch network, called the way the pipeline calls it, at a new shape."""
    g = torch.Generator().manual_seed(seed)
    unet, vae, text = torch_pipe.unet, torch_pipe.vae, torch_pipe.text_encoder
    size = unet.config.sample_size
    x = torch.randn(3, unet.config.in_channels, size, size + 2, generator=g)
    context = torch.randn(3, 2 * torch_pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=g)
    for t in (torch.tensor(999), torch.tensor([5.0, 500.0, 990.0])):
        assert_close(onnx_pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0],
                     unet(x, t, encoder_hidden_states=context, return_dict=False)[0])
    assert_close(onnx_pipe.vae.decode(x, return_dict=False)[0], vae.decode(x, return_dict=False)[0])
    pixels = torch.rand(2, 3, 8 * torch_pipe.vae_scale_factor, 4 * torch_pipe.vae_scale_factor, generator=g) * 2 - 1
    got, want = onnx_pipe.vae.encode(pixels).latent_dist, vae.encode(pixels).latent_dist
    assert_close(got.mode(), want.mode())
    assert_close(got.std, want.std)
    ids = torch.randint(0, text.config.vocab_size, (2, torch_pipe.tokenizer.model_max_length), generator=g)
    got, want = onnx_pipe.text_encoder(ids, output_hidden_states=True), text(ids, output_hidden_states=True)
    assert_close(got[0], want[0])
    assert_close(onnx_pipe.text_encoder.final_layer_norm(got.hidden_states[-2]),
                 getattr(text, "text_model", text).final_layer_norm(want.hidden_states[-2]))


def test_tiny_export_writes_a_self_contained_folder_whose_graphs_match_pytorch(tiny_model_dir, tiny_onnx):
    record = json.loads((tiny_onnx / EXPORT_RECORD).read_text())
    assert [c["graph"] for c in record["checks"]] == [
        "unet/model.onnx", "vae_decoder/model.onnx", "vae_encoder/model.onnx", "text_encoder/model.onnx",
        "text_encoder/final_layer_norm.onnx"]
    assert all(c["max_abs_error"] <= c["tolerance"] for c in record["checks"])
    assert not list(tiny_onnx.rglob("*.safetensors"))  # the folder loads on its own, without the torch weights
    check_components(load_pipeline(tiny_model_dir), load_pipeline(tiny_onnx, backend="onnx"))


def test_unet_and_vae_attention_is_one_onnxruntime_multi_head_attention_node(tiny_onnx):
    """No score matrix left for onnxruntime to materialise (`ldm_pipeline.onnx_attention`); CLIP's causal attention
    keeps torch's decomposition. The graphs' numbers are checked against PyTorch by the export and the test above."""
    onnx = pytest.importorskip("onnx")

    def ops(graph: str) -> Counter:
        return Counter(node.op_type for node in onnx.load(str(tiny_onnx / graph)).graph.node)

    for graph in ("unet/model.onnx", "vae_decoder/model.onnx", "vae_encoder/model.onnx"):
        assert ops(graph)["MultiHeadAttention"] > 0 and ops(graph)["Softmax"] == 0, graph
    assert ops("text_encoder/model.onnx")["MultiHeadAttention"] == 0


def test_sessions_open_the_optimized_copy_the_export_saved(tiny_onnx, tmp_path, caplog):
    """Optimized once at export (onnxruntime's EXTENDED level, saved beside each graph), with the same numbers; a copy
    that cannot be written is skipped with the reason logged, and sessions then open the exported graph."""
    record = json.loads((tiny_onnx / EXPORT_RECORD).read_text())
    assert all(optimized_path(tiny_onnx / c["graph"]).is_file() for c in record["checks"])
    unet = tiny_onnx / "unet" / "model.onnx"
    plain = tmp_path / "model.onnx"
    shutil.copy(unet, plain)
    assert OnnxGraph(unet).source == optimized_path(unet) and OnnxGraph(plain).source == plain
    config = json.loads((tiny_onnx / "unet" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, config["in_channels"], 6, 10, generator=g), "timestep": torch.tensor([3.0, 700.0]),
              "encoder_hidden_states": torch.randn(2, 9, config["cross_attention_dim"], generator=g)}
    assert_close(OnnxGraph(unet)(**inputs)[0], OnnxGraph(plain)(**inputs)[0])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline.onnx_backend"):
        assert save_optimized(broken) is None
    assert f"No optimized copy of {broken}" in caplog.text and not optimized_path(broken).exists()


def test_embedded_model_export_matches_pytorch_per_component(embedded_onnx):
    check_components(load_pipeline(), load_pipeline(embedded_onnx, backend="onnx"), seed=1)


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))}


def test_generate_with_backend_onnx_writes_the_same_images_and_recipes(tmp_path, monkeypatch):
    """The embedded model through the export cache: same pixels (within the tolerance) and recipes, plus the backend."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    args = [PROMPT, "--n", "3", "--seed", "5", "--guidance-rescale", "0.3", "--clip-skip", "1"]
    assert generate([*args, "--out", str(tmp_path / "pytorch"), "--backend", "pytorch"]) == 0
    assert generate([*args, "--out", str(tmp_path / "onnx"), "--backend", "onnx"]) == 0
    exported = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(exported) == 1 and (exported[0] / EXPORT_RECORD).is_file()
    a, b = pngs(tmp_path / "pytorch"), pngs(tmp_path / "onnx")
    assert a.keys() == b.keys() and len(a) == 3
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= PIXEL_TOLERANCE
    for name in a:
        ours, theirs = metadata.read_png(tmp_path / "pytorch" / name), metadata.read_png(tmp_path / "onnx" / name)
        assert (ours.recipe.pop("backend"), theirs.recipe.pop("backend")) == ("pytorch", "onnx")
        assert theirs.recipe["versions"].pop("onnxruntime")
        assert ours.recipe == theirs.recipe  # model id and hash too: the cache is keyed by the source model
        assert theirs.parameters.pop("Backend") == "onnx"
        assert ours.parameters == theirs.parameters
    (tmp_path / "onnx" / "00000_000.png").unlink()
    stamp = (exported[0] / "unet" / "model.onnx").stat().st_mtime_ns
    assert generate([*args, "--out", str(tmp_path / "onnx"), "--backend", "onnx"]) == 0  # from the cache
    assert (exported[0] / "unet" / "model.onnx").stat().st_mtime_ns == stamp
    assert np.abs(pngs(tmp_path / "onnx")["00000_000.png"] - a["00000_000.png"]).max() <= PIXEL_TOLERANCE


def test_img2img_and_inpainting_run_the_exported_encoder(tiny_model_dir, tiny_onnx):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    options = dict(image=image, strength=0.7, num_inference_steps=4, seed=3, output_type="np", progress_bar=False)
    for extra in ({}, {"mask_image": mask}):
        want = load_pipeline(tiny_model_dir)("a red circle", **options, **extra).images
        got = load_pipeline(tiny_onnx, backend="onnx")("a red circle", **options, **extra).images
        assert np.abs(got - want).max() * 255 <= PIXEL_TOLERANCE


def test_stock_diffusers_onnx_pipeline_loads_the_export(tiny_onnx):
    """diffusers' own ONNX pipeline (deprecated, removed in diffusers 0.43) runs the folder as it is."""
    stock = getattr(pytest.importorskip("diffusers"), "OnnxStableDiffusionPipeline", None)
    if stock is None:
        pytest.skip("this diffusers has no OnnxStableDiffusionPipeline")
    pipe = stock.from_pretrained(tiny_onnx, provider="CPUExecutionProvider")
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    # stock assumes SD's 8x VAE; the tiny VAE is 2x, so 64 px -> 8 latents -> 16 px
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_wrong_options_and_folders_are_refused_with_the_fix(tiny_model_dir, tiny_onnx, tmp_path):
    with pytest.raises(ModelLoadError, match="backend='onnx'"):
        load_pipeline(tiny_onnx)
    with pytest.raises(ModelLoadError, match="trace apply to the PyTorch backend only"):
        load_pipeline(tiny_onnx, backend="onnx", trace=True)
    with pytest.raises(ModelLoadError, match="runs float32"):
        load_pipeline(tiny_onnx, backend="onnx", dtype="fp16")
    with pytest.raises(ModelLoadError, match="valid: pytorch, onnx"):
        load_pipeline(tiny_model_dir, backend="tensorrt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "unet").mkdir()
    (broken / "unet" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a complete ONNX export.*ldm-export-onnx"):
        load_pipeline(broken, backend="onnx")
    assert export_cli([str(tiny_model_dir), str(tiny_onnx)]) == 2  # an existing export is never overwritten


HIDE_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None; "


@pytest.mark.parametrize("command", [
    "from ldm_pipeline.generate import main; sys.exit(main(['a red circle', '--backend', 'onnx', '--out', 'o']))",
    "from ldm_pipeline.onnx_export import main; sys.exit(main(['default', 'out']))",
])
def test_missing_onnxruntime_names_the_extra_to_install(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", HIDE_ONNXRUNTIME + command], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "needs onnxruntime" in result.stderr and "pip install 'ldm-toolkit[onnx]'" in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_the_app_runs_onnx_runtime_by_default_on_the_cpu():
    import app
    from ldm_pipeline.onnx_backend import long_running_backend

    assert app.parse_args([]).backend == "auto"
    assert long_running_backend("cpu") == {"backend": "onnx"}  # the fastest warm (benchmarks/backend_speed.py)
    assert long_running_backend("cpu", trace=True) == {"backend": "pytorch", "trace": True}
    assert long_running_backend("cpu", dtype="bf16") == {"backend": "pytorch"}
