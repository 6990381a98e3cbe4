"""Shared pytest fixtures: a tiny SD model folder on disk, a live UI server, a system Chromium."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def app_server(tiny_model_dir, tmp_path_factory):
    """`python app.py --model <tiny model>` as a real subprocess on a free 127.0.0.1 port.

    Yields a namespace with `url`, `outputs` (the folder the server writes PNGs to) and `cache`
    (Gradio's upload and cache folder, GRADIO_TEMP_DIR).
    """
    yield from launched_app(tiny_model_dir, tmp_path_factory.mktemp("app-server"))


def launched_app(model: Path, workdir: Path, *extra_args: str):
    """Run `python app.py --model MODEL` in `workdir` until the generator is closed (see `app_server`)."""
    outputs = workdir / "outputs"
    cache = workdir / "gradio-cache"
    log_path = workdir / "server.log"
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               LDM_CACHE_DIR=str(workdir / "onnx-cache"),  # the app's ONNX export of the tiny model
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(cache), TMPDIR=str(workdir / "server-tmp"))  # --outputs outside cwd and TMPDIR
    command = [sys.executable, str(REPO_DIR / "app.py"), "--model", str(model),
               "--port", str(port), "--outputs", str(outputs), "--concurrency", "2", *extra_args]
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
