"""The SDXL refiner in the long-running service and the web UI (`python app.py --model BASE --refiner FOLDER`):
a request with "Switch at" equals the CLI's / Python's base + refiner hand-off, concurrent requests each get their
own refiner copy, and bad combinations are refused naming the fix."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import httpx
import numpy as np
import pytest
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from ldm_pipeline import metadata
from ldm_pipeline.hires import HiresFix
from ldm_pipeline.loading import load_pipeline
from ldm_pipeline.options import GenerationOptions, InvalidOptions
from ldm_pipeline.sdxl import Refiner
from ldm_pipeline.service import GenerationService, ServiceRequest
from tests.conftest import REPO_DIR, serve_app
from tests.test_sdxl_img2img import _scheduler, tiny_refiner_components
from training.tiny_models import tiny_sdxl_components
from webui.form import SDXL_SETTING_NAMES, SETTING_NAMES

pytestmark = pytest.mark.slow
HIRES_OFF = [False, 2.0, 0, 0.7, "Latent"]
COMMON = dict(num_inference_steps=6, width=32, height=32, guidance_scale=3.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner-app")
    base, refiner = root / "tiny-sdxl", root / "tiny-refiner"
    StableDiffusionXLPipeline(**tiny_sdxl_components(scheduler=_scheduler())).save_pretrained(base)
    StableDiffusionXLImg2ImgPipeline(**tiny_refiner_components()).save_pretrained(refiner)
    return base, refiner


@pytest.fixture(scope="module")
def service(folders, tmp_path_factory):
    base, refiner = folders
    return GenerationService.load(base, tmp_path_factory.mktemp("outputs"), refiner=refiner, device="cpu")


def hand_off(folders, prompt: str, seed: int, switch_at: float) -> np.ndarray:
    """The CLI's hand-off in Python (`sdxl.Refiner`), as uint8 pixels."""
    base, refiner = (load_pipeline(folder, device="cpu") for folder in folders)
    options = GenerationOptions(prompt=prompt, seed=seed, output_type="np", progress_bar=False, **COMMON)
    image = Refiner(refiner, switch_at)(base, options).images[0]
    return image


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def test_service_requests_hand_off_as_the_cli_does_even_concurrently(service, folders):
    requests = [ServiceRequest(GenerationOptions(prompt=p, seed=s, **COMMON), refiner_switch_at=w)
                for p, s, w in (("red circle", 4, 0.7), ("blue square", 5, 0.5))]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two requests, two switch points, at once
        results = list(pool.map(service.generate, requests))
    for (p, s, w), [(path, recipe)] in zip((("red circle", 4, 0.7), ("blue square", 5, 0.5)), results):
        assert np.abs(pixels(path) - hand_off(folders, p, s, w)).max() <= 1 / 255 + 1e-6
        assert recipe["refiner"] == {"name": "tiny-refiner", "hash": service.refiner.pipe.model_hash, "switch_at": w}
        assert metadata.read_png(path).parameters["Refiner switch at"] == str(w)
    plain, = service.generate(ServiceRequest(GenerationOptions(prompt="red circle", seed=4, **COMMON)))
    assert "refiner" not in plain[1] and np.abs(pixels(plain[0]) - pixels(results[0][0][0])).max() > 1 / 255


@pytest.mark.parametrize("change, message", [
    (dict(refiner_switch_at=1.0), "Refiner switch at must be a fraction strictly between 0 and 1"),
    (dict(refiner_switch_at="late"), "Refiner switch at must be a fraction strictly between 0 and 1"),
    (dict(refiner_switch_at=0.8, options=GenerationOptions(prompt="x", hires=HiresFix(2.0), **COMMON)),
     "The refiner takes over text to image only: turn off the hires fix"),
])
def test_bad_refiner_requests_are_refused_naming_the_fix(service, change, message):
    request = ServiceRequest(GenerationOptions(prompt="x", **COMMON))
    with pytest.raises(InvalidOptions, match=message):
        service.check(ServiceRequest(**{**request.__dict__, **change}))


def test_a_service_without_a_refiner_refuses_a_switch(folders, tmp_path):
    plain = GenerationService.load(folders[0], tmp_path, device="cpu")
    with pytest.raises(InvalidOptions, match="No refiner is loaded: start the app with --refiner FOLDER"):
        plain.check(ServiceRequest(GenerationOptions(prompt="x", **COMMON), refiner_switch_at=0.8))


def test_app_refiner_over_http_and_its_png_sends_the_switch_back(folders, tmp_path_factory):
    from gradio_client import handle_file

    from tests.test_app_server import txt2img_args

    base, refiner = folders
    with serve_app(tmp_path_factory, base, "--refiner", str(refiner)) as server:
        config = httpx.get(f"{server.url}config", timeout=30).json()
        assert any(c["props"].get("label", "").startswith("Switch at") for c in config["components"])
        client = Client(server.url, verbose=False)
        form = txt2img_args(steps=6, seed=4, guidance_scale=3.0, width=32, height=32)
        sdxl_defaults = ["", "", 0, 0, 0, 0, 0, 0]  # SDXL_SETTING_NAMES: empty / 0 = the defaults
        result = client.predict(*form, *sdxl_defaults, *HIRES_OFF, True, 0.7, api_name="/txt2img")
        path = result[0][0]["image"]
        assert metadata.read_png(path).recipe["refiner"]["switch_at"] == 0.7
        expected = hand_off(folders, form[0], 4, 0.7)
        assert np.abs(pixels(path) - expected).max() <= 1 / 255 + 1e-6
        with pytest.raises(AppError, match="The refiner takes over text to image only"):
            client.predict(*form, *sdxl_defaults, True, 2.0, 0, 0.7, "Latent", True, 0.7, api_name="/txt2img")
        client.predict(handle_file(path), api_name="/png_info")
        updates = client.predict(api_name="/png_info_send")
        start = len(SETTING_NAMES) + len(SDXL_SETTING_NAMES) + 5  # then the hires fix's five
        assert [u.get("value") for u in updates[start : start + 2]] == [True, 0.7]


def test_app_refiner_needs_an_sdxl_model(tiny_model_dir, folders):
    done = subprocess.run([sys.executable, str(REPO_DIR / "app.py"), "--model", str(tiny_model_dir), "--refiner",
                           str(folders[1]), "--port", "0"], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO_DIR)})
    assert done.returncode != 0
    assert "error: --refiner needs an SDXL base model; --model is a sd model." in done.stderr
