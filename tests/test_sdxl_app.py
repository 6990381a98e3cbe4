"""`python app.py --model <tiny SDXL folder>` over HTTP: the SDXL fields appear (only for SDXL models),
the default size is the model's, and a generation equals the same request in Python."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from gradio_client import Client
from PIL import Image

from ldm_pipeline import load_pipeline, metadata, swap_scheduler
from tests.conftest import serve_app
from training.tiny_models import tiny_sdxl_components

pytestmark = pytest.mark.slow

SDXL_FORM = dict(  # SDXL_SETTING_NAMES, after the shared settings (SETTING_NAMES, from test_app_server)
    prompt_2="a blue square", negative_prompt_2="green", original_height=48, original_width=40, crop_top=4,
    crop_left=8, target_height=0, target_width=0,
)


def sdxl_args() -> list:
    from tests.test_app_server import txt2img_args
    from webui.form import SDXL_SETTING_NAMES

    assert list(SDXL_FORM) == list(SDXL_SETTING_NAMES)
    shared = txt2img_args(sampler="euler", steps=3, guidance_scale=4.0, seed=11)
    return [*shared, *SDXL_FORM.values()]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl"
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_server(sdxl_folder, tmp_path_factory):
    with serve_app(tmp_path_factory, sdxl_folder) as server:
        yield server


def labels(url: str) -> dict[str, dict]:
    config = httpx.get(f"{url}config", timeout=30).json()
    return {c["props"].get("label"): c["props"] for c in config["components"] if c["props"].get("label")}


def test_sdxl_form_has_second_prompts_size_conditioning_and_the_model_size(sdxl_server, app_server):

    shown = labels(sdxl_server.url)
    assert "Prompt 2 (second text encoder; empty = the prompt)" in shown and "Size conditioning (SDXL)" in shown
    assert shown["Width (multiple of 8)"]["value"] == 32 * 2  # unet sample_size 32 x VAE factor 2
    sd_form = labels(app_server.url)  # an SD model: none of them
    assert not [label for label in sd_form if "Prompt 2" in label or "SDXL" in label]


def test_sdxl_txt2img_over_http_equals_the_python_call(sdxl_server, sdxl_folder):
    result = Client(sdxl_server.url, verbose=False).predict(*sdxl_args(), api_name="/txt2img")
    path = result[0][0]["image"]
    recipe = metadata.read_png(path).recipe
    assert recipe["sdxl"] == {"prompt_2": "a blue square", "negative_prompt_2": "green", "original_size": [48, 40],
                              "crops_coords_top_left": [4, 8]}
    assert recipe["backend"] == "pytorch"  # --backend auto: no ONNX export of SDXL
    pipe = load_pipeline(sdxl_folder, device="cpu")
    swap_scheduler(pipe, "euler")
    expected = pipe("a red circle", prompt_2="a blue square", negative_prompt_2="green", original_size=(48, 40),
                    crops_coords_top_left=(4, 8), num_inference_steps=3, guidance_scale=4.0, width=32, height=32,
                    seed=11, output_type="np", progress_bar=False).images[0]
    got = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6


def test_sdxl_in_the_browser(sdxl_server, chromium_context, artifacts_dir):
    from tests.test_app_browser import open_txt2img

    page = chromium_context.new_page()
    try:
        open_txt2img(page, sdxl_server.url, "a red circle", {"Steps": 2, "Width": 32, "Height": 32, "Seed": 5151})
        page.get_by_label("Prompt 2 (second text encoder").fill("a blue square")
        page.locator("#txt2img-generate").click()
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        page.locator("#txt2img-info").get_by_text("5151", exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(artifacts_dir / "sdxl-txt2img.png"), full_page=True)
        assert image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]") == [True, 32, 32]
        written = [p for p in sdxl_server.outputs.glob("*.png") if p.name.endswith("seed5151.png")]
        assert len(written) == 1 and metadata.read_png(written[0]).recipe["sdxl"] == {"prompt_2": "a blue square"}
    finally:
        page.close()
