"""Shared pytest fixtures: a tiny SD model folder on disk, a live UI server, a system Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_DIR / "test-artifacts"

# Debian's Chromium; Playwright never downloads a browser here (offline, and it would not match the OS).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(tmp_path_factory):
    """One ONNX export cache for the session, never ~/.cache: `ldm-generate`'s default backend exports the
    embedded model there on first use (tests that need their own set LDM_CACHE_DIR themselves)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LDM_CACHE_DIR", str(tmp_path_factory.mktemp("ldm-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Stable-Diffusion-layout folder (safetensors) saved from `training/tiny_models.py` components."""
    from diffusers import StableDiffusionPipeline

    from training.tiny_models import tiny_sd_components

    folder = tmp_path_factory.mktemp("tiny-sd") / "model"
    pipe = StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory) -> Path:
    """A StableDiffusionXLPipeline folder (safetensors) saved from `training/tiny_models.py` components."""
    from diffusers import StableDiffusionXLPipeline

    from training.tiny_models import tiny_sdxl_components

    folder = tmp_path_factory.mktemp("tiny-sdxl") / "model"
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder, safe_serialization=True)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 240.0) -> None:
    """Poll `url` until it answers 200; fail with the server log if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with code {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"server did not answer {url} within {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def serve_app(tmp_path_factory, model: Path, *extra: str):
    """`python app.py --model <model> *extra` as a real subprocess on a free 127.0.0.1 port.

    Yields a namespace with `url`, `outputs` (the folder the server writes PNGs to), `cache`
    (Gradio's upload and cache folder, GRADIO_TEMP_DIR), `log` and `process`.
    """
    workdir = tmp_path_factory.mktemp("app-server")
    outputs = workdir / "outputs"
    cache = workdir / "gradio-cache"
    log_path = workdir / "server.log"
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               LDM_CACHE_DIR=str(workdir / "onnx-cache"),  # the app's ONNX export of the tiny model
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(cache), TMPDIR=str(workdir / "server-tmp"))  # --outputs outside cwd and TMPDIR
    command = [sys.executable, str(REPO_DIR / "app.py"), "--model", str(model),
               "--port", str(port), "--outputs", str(outputs), *extra]
    with open(log_path, "w") as log:
        (workdir / "server-tmp").mkdir()
        (workdir / "server-cwd").mkdir()
        process = subprocess.Popen(command, cwd=workdir / "server-cwd", env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process, log_path)
        yield type("AppServer", (), {"url": url, "outputs": outputs, "cache": cache, "log": log_path,
                                     "process": process})
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def app_server(tiny_model_dir, tmp_path_factory):
    """The app on the tiny model (`serve_app`), two generations at a time."""
    with serve_app(tmp_path_factory, tiny_model_dir, "--concurrency", "2") as server:
        yield server


@pytest.fixture
def fresh_app_server(tiny_model_dir, tmp_path_factory):
    """The app on the tiny model started for one test: nothing left in it by other tests' requests (the
    inpainting browser test's upload never reached the editor on the shared server after the raw-HTTP
    attack and bad-input tests, only in the full suite; not understood yet)."""
    with serve_app(tmp_path_factory, tiny_model_dir) as server:
        yield server


@pytest.fixture(scope="session")
def adapter_folders(tmp_path_factory):
    """A --lora-dir (style.safetensors, a LoRA of the tiny model as our training writes it, and a pickle file
    that must not be offered), an --embedding-dir (zorblax.safetensors) and, beside them, a LoRA outside
    the folder (`outside.safetensors`) that a `../outside` name would reach."""
    import torch
    from safetensors.torch import save_file

    from tests.test_lora_loading import write_lora
    from training.lora_export import KOHYA_FILE

    root = tmp_path_factory.mktemp("adapters")
    loras, embeddings = root / "loras", root / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    kohya = write_lora(root / "trained", seed=1) / KOHYA_FILE
    shutil.copy(kohya, loras / "style.safetensors")
    shutil.copy(kohya, loras / "pickled.pt")
    shutil.copy(kohya, root / "outside.safetensors")
    vector = torch.randn(32, generator=torch.Generator().manual_seed(4)) * 4
    save_file({"<zorblax>": vector}, str(embeddings / "zorblax.safetensors"))
    return type("AdapterFolders", (), {"loras": loras, "embeddings": embeddings, "outside": root / "outside.safetensors"})


@pytest.fixture(scope="session")
def adapter_app_server(tiny_model_dir, adapter_folders, tmp_path_factory):
    """The app with `--lora-dir` and `--embedding-dir` (`adapter_folders`), two generations at a time."""
    with serve_app(tmp_path_factory, tiny_model_dir, "--concurrency", "2", "--lora-dir", str(adapter_folders.loras),
                   "--embedding-dir", str(adapter_folders.embeddings)) as server:
        yield server


@pytest.fixture(scope="session")
def single_slot_app_server(tiny_model_dir, tmp_path_factory):
    """The app running one generation at a time (`--concurrency 1`): a second request has to wait."""
    with serve_app(tmp_path_factory, tiny_model_dir, "--concurrency", "1", "--backend", "pytorch") as server:
        yield server


@pytest.fixture(scope="session")
def chromium_context():
    """A headless system Chromium driven by Playwright, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's `chromium` (./.ci/run does, as root).")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def artifacts_dir(request) -> Path:
    """`test-artifacts/<test name>/` in the repository (gitignored): screenshots and other evidence."""
    folder = ARTIFACTS_DIR / request.node.name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
