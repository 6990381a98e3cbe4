"""The app's file-read hole stays closed: a client can only make the server read files it uploaded itself.

Every attack runs against a real `python app.py` (the shared `app_server`) over raw HTTP, so the
JSON names server paths exactly as an attacker's script would (gradio_client would upload the
path from the client's own disk instead). Each refusal must name the input, quote no path, leak
no byte of the file, copy nothing into Gradio's cache, and the path must not be served.
"""

from __future__ import annotations

import os
import re

import httpx
import numpy as np
import pytest
from app_http import call, endpoints_taking_files, error_of, file_data, upload
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, PngImagePlugin
from test_app_server import txt2img_args

pytestmark = pytest.mark.slow

SECRET = "ldm-secret-7f3a9c0e"  # in every planted file; must never come back
NO_PREVIEW = [0, "cheap", None]  # preview every 0 steps (off), its mode, and the history State's slot
FILE_ENDPOINTS = {  # api name -> the inputs of one call with `fd` as its file
    "img2img": lambda fd: [*txt2img_args(seed=1), fd, 0.6, *NO_PREVIEW],
    "inpaint": lambda fd: [*txt2img_args(seed=1), {"background": fd, "layers": [], "composite": None}, 1.0, *NO_PREVIEW],
    "png_info": lambda fd: [fd],
}
INPAINT_LAYER = lambda fd: [*txt2img_args(seed=1), {"background": None, "layers": [fd], "composite": fd}, 1.0, *NO_PREVIEW]  # noqa: E731


def secret_png(path):
    """A valid PNG whose embedded parameters are the secret (PNG info would print them if it read the file)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{SECRET}\nSteps: 2, Seed: 1")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def planted(app_server, tmp_path_factory):
    """Secret files outside any upload folder, symlinks to them (one planted inside the cache) and a victim's upload."""
    outside = tmp_path_factory.mktemp("outside")
    png = secret_png(outside / "secret.png")
    (outside / "link.png").symlink_to(png)
    inside = app_server.cache / "planted"
    inside.mkdir(parents=True, exist_ok=True)
    (inside / "link.png").symlink_to(png)
    victim = secret_png(outside / "victim.png")
    victim_path = upload(app_server.url, victim)
    message, _ = call(app_server.url, "png_info", [file_data(victim_path)], session="victim-session")
    assert error_of(message) is None and SECRET in str(message["output"]["data"])  # the owner reads it
    return {
        "etc-hostname": "/etc/hostname",
        "outside-temp": str(png),
        "traversal": os.path.join(str(app_server.cache), os.path.relpath(png, app_server.cache)),
        "symlink-outside": str(outside / "link.png"),
        "symlink-in-cache": str(inside / "link.png"),
        "other-session-upload": victim_path,
        "url": f"{app_server.url}gradio_api/file={victim_path}",
    }


def cache_files(app_server) -> set[str]:
    return {str(p) for p in app_server.cache.rglob("*")}


def assert_refused(error: str | None, raw: str, label: str):
    assert error is not None, "the request was not refused"
    assert error.startswith(label) and "only reads files uploaded in this session" in error, error
    assert not re.search(r"/(etc|tmp|home|root|work)\b|gradio-cache|secret", error), f"the message quotes a path: {error}"
    assert SECRET not in raw and "Traceback" not in raw


LABELS = {"img2img": "Init image", "inpaint": "Image: paint over", "png_info": "PNG written by this toolkit"}
KINDS = ["etc-hostname", "outside-temp", "traversal", "symlink-outside", "symlink-in-cache", "other-session-upload", "url"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("api_name", sorted(FILE_ENDPOINTS))
def test_a_path_the_session_did_not_upload_is_refused_unread(app_server, planted, api_name, kind):
    before = cache_files(app_server)
    for meta in (True, False):  # with Gradio's FileData marker and without it
        message, raw = call(app_server.url, api_name, FILE_ENDPOINTS[api_name](file_data(planted[kind], meta)),
                            session=f"attacker-{api_name}-{kind}")
        assert_refused(error_of(message), raw, LABELS[api_name])
    assert cache_files(app_server) == before, "something was copied into Gradio's cache"


@pytest.mark.parametrize("kind", ["etc-hostname", "outside-temp", "symlink-in-cache"])
def test_inpainting_layers_are_checked_too(app_server, planted, kind):
    message, raw = call(app_server.url, "inpaint", INPAINT_LAYER(file_data(planted[kind])), session=f"layer-{kind}")
    assert_refused(error_of(message), raw, LABELS["inpaint"])


@pytest.mark.parametrize("kind", ["etc-hostname", "outside-temp", "traversal", "symlink-outside", "symlink-in-cache"])
def test_the_file_route_does_not_serve_paths_outside_the_cache(app_server, planted, kind):
    response = httpx.get(f"{app_server.url}gradio_api/file={planted[kind]}", timeout=30)
    assert response.status_code in (403, 404) and SECRET not in response.text


def test_the_outputs_folder_is_not_served_directly(app_server):
    result = Client(app_server.url, verbose=False).predict(*txt2img_args(seed=3), api_name="/txt2img")
    written = sorted(app_server.outputs.glob("*.png"))
    assert written and result[0]
    response = httpx.get(f"{app_server.url}gradio_api/file={written[-1]}", timeout=30)
    assert response.status_code == 403  # only the copy the response named (in Gradio's cache) is served


def test_every_endpoint_taking_files_is_attacked_here(app_server):
    """A new file input must be added to FILE_ENDPOINTS (the guard itself covers every event)."""
    assert endpoints_taking_files(app_server.url) == set(FILE_ENDPOINTS)


def test_the_issue_attack_through_gradio_client(app_server):
    """The issue's exact call. gradio_client uploads the path from the client's own disk first, so the
    server only sees the client's upload of it: refused as not an image, quoting no path."""
    with pytest.raises(AppError) as refused:
        Client(app_server.url, verbose=False).predict(
            *txt2img_args(), {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, 0.6, api_name="/img2img")
    message = str(refused.value)
    assert message.startswith("Init image: the file is not a readable image"), message
    assert not re.search(r"/(etc|tmp)\b", message) and open("/etc/hostname").read().strip() not in message


def test_honest_uploads_work_and_stay_with_their_session(app_server, tmp_path):
    png = secret_png(tmp_path / "mine.png")
    client = Client(app_server.url, verbose=False)
    text = client.predict(handle_file(str(png)), api_name="/png_info")
    assert text.startswith(SECRET)  # my own file, read back to me
    result = client.predict(*txt2img_args(seed=4), handle_file(str(png)), 0.5, api_name="/img2img")
    assert len(result[0]) == 1
    other = tmp_path / "once.png"  # new bytes: each upload of a content lets one session claim it
    Image.fromarray(np.full((32, 32, 3), 17, np.uint8)).save(other)
    path = upload(app_server.url, other)  # raw: one upload, used twice by its session, refused to another
    for _ in range(2):
        message, _ = call(app_server.url, "img2img", FILE_ENDPOINTS["img2img"](file_data(path)), session="owner")
        assert error_of(message) is None
    message, raw = call(app_server.url, "img2img", FILE_ENDPOINTS["img2img"](file_data(path)), session="other")
    assert_refused(error_of(message), raw, LABELS["img2img"])
