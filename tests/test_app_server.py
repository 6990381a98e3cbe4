"""The UI as users reach it: `python app.py` in a subprocess, driven over HTTP with gradio_client."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import time

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from ldm_pipeline import load_pipeline, metadata, swap_scheduler

pytestmark = pytest.mark.slow

FORM = dict(  # the txt2img fields in the order SETTING_NAMES lists them
    prompt="a red circle", negative_prompt="", sampler="ddim", schedule_type="Automatic", steps=2, guidance_scale=7.5,
    guidance_schedule="constant", guidance_min_scale=1.0, use_interval=False, sigma_lo=0.28, sigma_hi=5.42,
    guidance_rescale=-1, width=32, height=32, seed=-1, batch_count=1, batch_size=1,
    guidance_method="cfg", apg_eta=0.0, apg_norm_threshold=15.0, apg_momentum=-0.5, cfg_zero_init_steps=1.0,
    pag_scale=0.0, pag_layers="mid",
)


def txt2img_args(**changes) -> list:
    from webui.form import SETTING_NAMES

    form = {**FORM, **changes}
    assert list(form) == list(SETTING_NAMES)
    return list(form.values())


@pytest.fixture(scope="module")
def client(app_server) -> Client:
    return Client(app_server.url, verbose=False)


@pytest.fixture(scope="module")
def reference_pipe(tiny_model_dir):
    """The same model loaded in the test process, to regenerate what the server should return."""
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    swap_scheduler(pipe, "ddim")
    return pipe


def gallery_paths(result) -> list[str]:
    gallery = result[0]
    return [entry["image"] for entry in gallery]


def test_txt2img_png_carries_the_requested_parameters(client, app_server):
    request = dict(prompt="a blue square, on grey", negative_prompt="blurry", steps=3, guidance_scale=5.0,
                   width=40, height=32, seed=1234, batch_count=2, batch_size=2, guidance_rescale=0.3,
                   use_interval=True, sigma_lo=0.5, sigma_hi=20.0, guidance_schedule="linear_up")
    result = client.predict(*txt2img_args(**request), api_name="/txt2img")
    paths = gallery_paths(result)
    assert len(paths) == 4
    for k, path in enumerate(paths):
        found = metadata.read_png(path)
        recipe, params = found.recipe, found.parameters
        assert recipe["prompt"] == request["prompt"] and recipe["negative_prompt"] == "blurry"
        assert (recipe["seed"], recipe["steps"], recipe["width"], recipe["height"]) == (1234 + k, 3, 40, 32)
        assert recipe["guidance"] == {"scale": 5.0, "schedule": "linear_up", "min_scale": 1.0, "rescale": 0.3,
                                      "interval": {"sigma_lo": 0.5, "sigma_hi": 20.0}}
        assert recipe["scheduler"]["class"] == "DDIMSampler"  # our "ddim" from the registry
        assert recipe["backend"] == ("onnx" if importlib.util.find_spec("onnxruntime") else "pytorch")  # --backend auto
        assert params["Prompt"] == request["prompt"] and params["Negative prompt"] == "blurry"
        assert (params["Seed"], params["Steps"], params["Size"]) == (str(1234 + k), "3", "40x32")
        assert Image.open(path).size == (40, 32)
        # the caption is the parameters text; the seed actually used is listed in the summary
        assert result[0][k]["caption"] == found.parameters_text
        assert f"seed **{1234 + k}**" in result[1]
    # the same files, written atomically, are in the server's outputs folder (no temporaries left)
    written = sorted(p.name for p in app_server.outputs.glob("*.png"))
    assert all(any(name.endswith(f"seed{1234 + k}.png") for name in written) for k in range(4))
    assert not list(app_server.outputs.glob(".*.tmp"))


def test_random_seed_is_reported_and_reproducible(client):
    first = client.predict(*txt2img_args(seed=-1), api_name="/txt2img")
    seed = metadata.read_png(gallery_paths(first)[0]).recipe["seed"]
    assert f"seed **{seed}**" in first[1]
    again = client.predict(*txt2img_args(seed=seed), api_name="/txt2img")
    np.testing.assert_array_equal(np.asarray(Image.open(gallery_paths(first)[0])),
                                  np.asarray(Image.open(gallery_paths(again)[0])))


@pytest.mark.parametrize("changes, message", [
    ({"width": 36}, "Width must be a multiple of 8"),
    ({"steps": 0}, "Steps (num_inference_steps) must be a whole number from 1"),
    ({"batch_size": 17}, "Batch size must be from 1 to 16"),
    ({"sampler": "no-such-sampler"}, "Unknown sampler 'no-such-sampler'"),
    ({"use_interval": True, "sigma_lo": 5.0, "sigma_hi": 1.0}, "Guidance interval needs 0 <= sigma_lo < sigma_hi"),
])
def test_invalid_input_returns_a_readable_message(client, changes, message):
    with pytest.raises(AppError) as error:
        client.predict(*txt2img_args(**changes), api_name="/txt2img")
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)


def test_eight_simultaneous_requests_get_their_own_images(app_server, reference_pipe):
    """8 clients at once (concurrency limit 2) plus one bad request: every good one gets the image of its seed."""
    seeds = [100 + 7 * i for i in range(8)]
    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow", "white", "black", "grey", "pink")]
    clients = [Client(app_server.url, verbose=False) for _ in range(9)]
    jobs = [c.submit(*txt2img_args(prompt=p, seed=s), api_name="/txt2img") for c, p, s in zip(clients, prompts, seeds)]
    bad = clients[8].submit(*txt2img_args(width=33), api_name="/txt2img")
    with pytest.raises(AppError, match="Width must be a multiple of 8"):
        bad.result(timeout=300)
    for job, prompt, seed in zip(jobs, prompts, seeds):
        path = gallery_paths(job.result(timeout=300))[0]
        recipe = metadata.read_png(path).recipe
        assert (recipe["prompt"], recipe["seed"]) == (prompt, seed)
        expected = reference_pipe(prompt, seed=seed, num_inference_steps=2, width=32, height=32,
                                  progress_bar=False, output_type="np").images[0]
        got = np.asarray(Image.open(path)).astype(np.float32) / 255
        np.testing.assert_allclose(got, expected, atol=1.5 / 255)


def test_cancel_stops_the_pipeline(app_server):
    """Cancel from the same session: the server stops generating (no new files) and keeps serving."""
    client = Client(app_server.url, verbose=False)
    before = set(app_server.outputs.glob("*.png"))
    job = client.submit(*txt2img_args(prompt="a long job", steps=50, batch_count=64, seed=5), api_name="/txt2img")
    deadline = time.monotonic() + 120
    progress = []
    # until the run has written an image and reported progress (a warm server can write before the first poll)
    while not (set(app_server.outputs.glob("*.png")) - before and progress) and time.monotonic() < deadline:
        progress += job.status().progress_data or []  # gr.Progress, driven by the pipeline's step callback
        time.sleep(0.1)  # wait until the run has really started writing
    steps = [p for p in progress if p.unit == "steps"]
    assert steps and all(p.length == 50 * 64 and 1 <= p.index <= p.length for p in steps), progress
    client.predict(api_name="/txt2img_cancel")
    try:  # the run ends either way: with the images made so far, or cancelled by Gradio's queue
        job.result(timeout=60)
    except (concurrent.futures.CancelledError, AppError):
        pass
    time.sleep(2.0)
    made = set(app_server.outputs.glob("*.png")) - before
    time.sleep(3.0)
    assert set(app_server.outputs.glob("*.png")) - before == made, "the pipeline kept running after Cancel"
    assert 1 <= len(made) < 64
    assert len(gallery_paths(client.predict(*txt2img_args(seed=9), api_name="/txt2img"))) == 1


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    """A 32x32 picture: left half red, right half blue."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16, 0] = 220
    image[:, 16:, 2] = 220
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(image).save(path)
    return path


def test_img2img_uses_the_uploaded_image_and_strength(client, init_png):
    from gradio_client import handle_file

    result = client.predict(*txt2img_args(seed=11, steps=4), handle_file(str(init_png)), 0.5, api_name="/img2img")
    recipe = metadata.read_png(gallery_paths(result)[0]).recipe
    assert (recipe["strength"], recipe["inpainting"], recipe["seed"]) == (0.5, False, 11)
    assert "Denoising strength: 0.5" in result[0][0]["caption"]


def test_inpainting_takes_the_painted_mask(client, init_png, tmp_path):
    from gradio_client import handle_file

    stroke = np.zeros((32, 32, 4), np.uint8)
    stroke[8:24, 8:24] = 255  # a white square painted on the layer
    layer = tmp_path / "layer.png"
    Image.fromarray(stroke, "RGBA").save(layer)
    editor = {"background": handle_file(str(init_png)), "layers": [handle_file(str(layer))], "composite": None}
    result = client.predict(*txt2img_args(seed=12), editor, 1.0, api_name="/inpaint")
    recipe = metadata.read_png(gallery_paths(result)[0]).recipe
    assert (recipe["inpainting"], recipe["strength"], recipe["seed"]) == (True, 1.0, 12)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((32, 32, 4), np.uint8), "RGBA").save(empty)
    editor["layers"] = [handle_file(str(empty))]
    with pytest.raises(AppError, match="The mask is empty: paint over the part"):
        client.predict(*txt2img_args(seed=12), editor, 1.0, api_name="/inpaint")


def test_png_info_reads_our_parameters_back(client):
    from gradio_client import handle_file

    made = client.predict(*txt2img_args(prompt="a green star", seed=77), api_name="/txt2img")
    path = gallery_paths(made)[0]
    text = client.predict(handle_file(path), api_name="/png_info")  # the State output stays on the server
    assert text == metadata.read_png(path).parameters_text
    assert text.startswith("a green star\n") and "Seed: 77" in text
