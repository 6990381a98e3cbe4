"""Bad input to the app over HTTP: every field of txt2img / img2img / inpaint / PNG info, through gradio_client.

Each bad value must end in one gr.Error naming the field, with no traceback and no server path,
leave nothing in the outputs folder, and the server must keep serving. Odd but valid init
images (RGBA, greyscale, 16-bit, palette) must work.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from app_http import call, error_of, input_defaults, upload
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_app_server import txt2img_args

from ldm_pipeline import metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(app_server) -> Client:
    return Client(app_server.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Uploads: a good PNG, odd-but-valid modes, a text file, a truncated PNG, a huge image."""
    folder = tmp_path_factory.mktemp("uploads")
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16, 0] = 200
    made = {"good": Image.fromarray(rgb), "rgba": Image.fromarray(np.dstack([rgb, np.full((32, 32), 128, np.uint8)])),
            "grey": Image.fromarray(rgb[..., 0]), "grey16": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
            "palette": Image.fromarray(rgb).convert("P"), "huge": Image.new("L", (5000, 4000), 30)}
    paths = {}
    for name, image in made.items():
        image.save(folder / f"{name}.png")
        paths[name] = folder / f"{name}.png"
    (folder / "text.png").write_text("not an image at all\n")
    data = paths["good"].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("hello\n")
    return {**paths, "text": folder / "text.png", "truncated": folder / "truncated.png", "txt": folder / "notes.txt"}


def editor(background, layer=None) -> dict:
    return {"background": background, "layers": [layer] if layer else [], "composite": None}


def img2img(path_key, strength=0.6, **form):
    return lambda files: ([*txt2img_args(**form), handle_file(str(files[path_key])), strength], "/img2img")


def inpaint(background_key, layer_key=None, **form):
    def build(files):
        layer = handle_file(str(files[layer_key])) if layer_key else None
        return [*txt2img_args(**form), editor(handle_file(str(files[background_key])), layer), 1.0], "/inpaint"
    return build


def txt2img(**form):
    return lambda files: (txt2img_args(**form), "/txt2img")


CASES = {  # id -> (build(files) -> (args, api_name), what the message must contain: the field's name)
    "guidance-nan": (txt2img(guidance_scale=math.nan), "Guidance scale"),
    "guidance-inf": (txt2img(guidance_scale=math.inf), "Guidance scale"),
    "guidance-huge": (txt2img(guidance_scale=1e9), "Guidance scale"),
    "guidance-bool": (txt2img(guidance_scale=True), "Guidance scale"),
    "min-scale-nan": (txt2img(guidance_min_scale=math.nan), "Minimum scale of the ramps"),
    "rescale-2": (txt2img(guidance_rescale=2.0), "Guidance rescale"),
    "schedule-unknown": (txt2img(guidance_schedule="wobble"), "Dynamic guidance"),
    "interval-inf": (txt2img(use_interval=True, sigma_lo=math.inf), "sigma low"),
    "interval-flag-string": (txt2img(use_interval="yes"), "Guide only inside"),
    "steps-huge": (txt2img(steps=100000), "Steps"),
    "steps-fraction": (txt2img(steps=1.5), "Steps"),
    "steps-string": (txt2img(steps="5"), "Steps"),
    "steps-zero": (txt2img(steps=0), "Steps"),
    "width-huge": (txt2img(width=100000), "Width"),
    "width-zero": (txt2img(width=0), "Width"),
    "width-string": (txt2img(width="abc"), "Width"),
    "height-fraction": (txt2img(height=32.5), "Height"),
    "seed-negative": (txt2img(seed=-7), "Seed"),
    "seed-over-2-63": (txt2img(seed=2**63 + 5), "Seed"),
    "seed-inf": (txt2img(seed=math.inf), "Seed"),
    "batch-size-zero": (txt2img(batch_size=0), "Batch size"),
    "batch-count-huge": (txt2img(batch_count=10**6), "Batch count"),
    "sampler-unknown": (txt2img(sampler="no-such-sampler"), "sampler"),
    "sampler-number": (txt2img(sampler=3), "sampler"),
    "prompt-empty": (txt2img(prompt="   "), "prompt"),
    "prompt-number": (txt2img(prompt=123), "Prompt"),
    "negative-list": (txt2img(negative_prompt=["a"]), "Negative prompt"),
    "img2img-text-file": (img2img("text"), "Init image"),
    "img2img-truncated": (img2img("truncated"), "Init image"),
    "img2img-huge-image": (img2img("huge"), "Init image"),
    "img2img-strength-zero": (img2img("good", strength=0.0), "Strength"),
    "img2img-strength-nan": (img2img("good", strength=math.nan), "Strength"),
    "img2img-bad-steps": (img2img("good", steps=-3), "Steps"),
    "inpaint-text-background": (inpaint("text"), "Image: paint over"),
    "inpaint-truncated-layer": (inpaint("good", "truncated"), "Image: paint over"),
    "inpaint-empty-mask": (inpaint("good"), "mask is empty"),
    "png-info-not-png": (lambda files: ([handle_file(str(files["txt"]))], "/png_info"), "PNG written by this toolkit"),
}


def outputs_listing(app_server) -> set[str]:
    return {p.name for p in app_server.outputs.glob("*")} if app_server.outputs.exists() else set()


def refusal(client, app_server, args: list, api_name: str) -> str:
    """The error message of one call: through gradio_client, or raw HTTP for NaN / inf (which it cannot send)."""
    if all(not isinstance(a, float) or math.isfinite(a) for a in args):
        with pytest.raises(AppError) as refused:
            client.predict(*args, api_name=api_name)
        return str(refused.value)
    args = [{**a, "path": upload(app_server.url, Path(a["path"]))} if isinstance(a, dict) and "meta" in a else a
            for a in args]
    if api_name != "/png_info":  # raw calls pass every input: the form's own values for those not given
        args = [*args, *input_defaults(app_server.url, api_name.strip("/"))[len(args):]]
    message, raw = call(app_server.url, api_name.strip("/"), args)
    assert "Traceback" not in raw
    return error_of(message) or pytest.fail("the request was not refused")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error_naming_the_field(client, app_server, files, case):
    build, field = CASES[case]
    args, api_name = build(files)
    before = outputs_listing(app_server)
    message = refusal(client, app_server, args, api_name)
    assert field in message, f"{case}: the message does not name {field!r}: {message}"
    assert "Traceback" not in message and "Error:" not in message.split(":")[0], message
    assert not re.search(r"/(tmp|etc|home|root|work|usr)\b|gradio-cache|\.py\b", message), f"{case}: a path: {message}"
    assert outputs_listing(app_server) == before, f"{case}: files appeared in the outputs folder"


def test_a_png_that_is_not_a_png_is_explained_without_a_path(client, files):
    text = client.predict(handle_file(str(files["truncated"])), api_name="/png_info")
    assert text.startswith("Cannot read this file as a PNG") and not re.search(r"/(tmp|work)\b", text)


@pytest.mark.parametrize("mode", ["rgba", "grey", "grey16", "palette"])
def test_init_images_of_any_mode_work(client, files, mode):
    result = client.predict(*txt2img_args(seed=21), handle_file(str(files[mode])), 0.5, api_name="/img2img")
    path = result[0][0]["image"]
    assert metadata.read_png(path).recipe["strength"] == 0.5 and Image.open(path).size == (32, 32)


def test_the_server_keeps_serving_after_the_bad_inputs(client, app_server, files):
    assert len(client.predict(*txt2img_args(seed=5), api_name="/txt2img")[0]) == 1
    assert len(client.predict(*txt2img_args(seed=6), handle_file(str(files["good"])), 0.5, api_name="/img2img")[0]) == 1
    assert app_server.process.poll() is None


def test_an_upload_over_the_size_limit_is_refused(app_server, tmp_path):
    import httpx

    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(65 * 2**20)  # just over the 64 MB cap
    with open(big, "rb") as f:
        response = httpx.post(f"{app_server.url}gradio_api/upload", files=[("files", ("big.png", f))], timeout=120)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert not any(p.name == "big.png" for p in app_server.cache.rglob("*"))
