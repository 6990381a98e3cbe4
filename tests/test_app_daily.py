"""The app as a daily tool, over HTTP against a real `python app.py --lora-dir --embedding-dir`: LoRA and
embedding pickers, per-session history sent back to the form, PNG info's sampler and schedule type, the
queue position while waiting behind another user, and the file-read attack on the new endpoints."""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
import shutil
import time

import numpy as np
import pytest
from app_http import call, endpoints_taking_files, error_of, file_data
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_app_security import FILE_ENDPOINTS, SECRET, secret_png
from test_app_server import gallery_paths, txt2img_args

from ldm_pipeline import load_pipeline, metadata, swap_scheduler
from webui.form import SETTING_NAMES

pytestmark = pytest.mark.slow
HIRES_OFF = [False, 2.0, 0, 0.7, "Latent"]  # the txt2img hires fix inputs (before the preview interval), off


@pytest.fixture(scope="module")
def client(adapter_app_server) -> Client:
    return Client(adapter_app_server.url, verbose=False)


def generate(client: Client, **form) -> tuple[np.ndarray, metadata.PngMetadata, dict]:
    """One txt2img image: its pixels, its PNG metadata, and its gallery entry."""
    result = client.predict(*txt2img_args(**form), api_name="/txt2img")
    path = gallery_paths(result)[0]
    return np.asarray(Image.open(path)).astype(int), metadata.read_png(path), result[0][0]


def sent_values(updates) -> dict:
    """The form fields a "Send to text to image" sets (setting name -> value)."""
    return {name: u["value"] for name, u in zip(SETTING_NAMES, updates) if "value" in u}


def kohya_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_a_lora_picked_by_name_changes_the_image_as_in_process_and_is_recorded(client, adapter_folders,
                                                                               tiny_model_dir):
    prompt = client.predict("a red circle", "style", 0.8, api_name="/txt2img_add_lora")
    assert prompt == "a red circle <lora:style:0.8>"
    base, _, _ = generate(client, prompt="a red circle", seed=7)
    styled, png, entry = generate(client, prompt=prompt, seed=7)
    assert np.abs(styled - base).max() > 2
    lora = adapter_folders.loras / "style.safetensors"
    assert png.recipe["prompt"] == "a red circle"  # the tag is not encoded
    assert png.recipe["loras"] == [{"name": "style", "hash": kohya_hash(lora), "scale": 0.8}]
    assert png.parameters["Prompt"] == prompt and png.parameters["Lora hashes"] == f"style: {kohya_hash(lora)}"
    assert entry["caption"] == png.parameters_text  # the gallery caption records it too
    reference = load_pipeline(tiny_model_dir, device="cpu")
    swap_scheduler(reference, "ddim")
    reference.load_lora_weights(str(lora))
    expected = reference("a red circle", width=32, height=32, num_inference_steps=2, seed=7, output_type="np",
                         cross_attention_kwargs={"scale": 0.8}, progress_bar=False).images[0]
    assert np.abs(styled - np.round(expected * 255)).max() <= 1


def test_concurrent_requests_with_and_without_the_lora_never_mix(adapter_app_server, client):
    """Two at a time on shared networks: each image equals the one made alone."""
    alone = {tag: generate(client, prompt=f"a blue square{tag}", seed=11)[0] for tag in ("", " <lora:style:1>")}
    clients = [Client(adapter_app_server.url, verbose=False) for _ in range(2)]
    tags = ["", " <lora:style:1>"] * 3
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        images = list(pool.map(lambda i: generate(clients[i % 2], prompt=f"a blue square{tags[i]}", seed=11)[0],
                               range(len(tags))))
    for tag, image in zip(tags, images):
        assert np.array_equal(image, alone[tag]), tag


@pytest.mark.parametrize("name, message", [
    ("../outside", "a LoRA name is a file name in --lora-dir, without '/', '\\' or '..'"),
    ("/etc/passwd", "a LoRA name is a file name in --lora-dir, without '/'"),
    ("nope", "no such LoRA in <path>; available: style."),
    ("pickled", "no such LoRA in <path>; available: style."),  # a .pt file is offered only with --allow-pickle
])
def test_lora_names_that_are_paths_or_not_in_the_folder_are_refused_unread(client, adapter_app_server,
                                                                            adapter_folders, name, message):
    written = set(adapter_app_server.outputs.glob("*.png"))
    with pytest.raises(AppError) as refused:
        client.predict(*txt2img_args(prompt=f"a red circle <lora:{name}:1>", seed=3), api_name="/txt2img")
    assert message in str(refused.value)
    assert str(adapter_folders.loras) not in str(refused.value)  # no server path in the message
    with pytest.raises(AppError) as picked:
        client.predict("a red circle", name, 1.0, api_name="/txt2img_add_lora")
    assert f"LoRA {name!r} is not in --lora-dir; choose one of style." in str(picked.value)  # names only, as listed
    assert set(adapter_app_server.outputs.glob("*.png")) == written


def test_refresh_offers_a_lora_copied_into_the_folder_while_the_server_runs(client, adapter_folders):
    added = adapter_folders.loras / "later.safetensors"
    shutil.copy(adapter_folders.loras / "style.safetensors", added)
    try:
        menu = client.predict("style", api_name="/txt2img_refresh_lora")
        assert menu["value"] == "style" and [c[0] for c in menu["choices"]] == ["later", "style"]  # no pickle file
        assert client.predict("a cat", "later", 0.5, api_name="/txt2img_add_lora") == "a cat <lora:later:0.5>"
    finally:
        added.unlink()
    menu = client.predict("style", api_name="/txt2img_refresh_lora")
    assert [c[0] for c in menu["choices"]] == ["style"]


def test_an_embedding_picked_by_name_changes_the_image_and_is_recorded(client, adapter_folders):
    assert client.predict("a red circle", "zorblax", 1.5, api_name="/txt2img_add_embedding") == \
        "a red circle (zorblax:1.5)"
    prompt = client.predict("a red circle", "zorblax", 1.0, api_name="/txt2img_add_embedding")
    assert prompt == "a red circle zorblax"
    base, base_png, _ = generate(client, prompt="a red circle", seed=5)
    used, png, _ = generate(client, prompt=prompt, seed=5)
    assert np.abs(used - base).max() > 2
    digest = hashlib.sha256((adapter_folders.embeddings / "zorblax.safetensors").read_bytes()).hexdigest()[:12]
    assert png.recipe["embeddings"] == [{"name": "zorblax", "hash": digest}]
    assert png.parameters["TI hashes"] == f"zorblax: {digest}"
    assert "embeddings" not in base_png.recipe  # loaded, but not in this prompt


def test_history_keeps_this_sessions_results_and_sends_one_back_to_the_form(adapter_app_server):
    mine, other = (Client(adapter_app_server.url, verbose=False) for _ in range(2))
    generate(mine, prompt="first picture", seed=21)
    generate(mine, prompt="second picture <lora:style:0.5>", seed=22, sampler="dpmpp-2m", schedule_type="Karras")
    generate(other, prompt="someone else's picture", seed=23)
    shown = mine.predict(api_name="/history")
    assert [entry["caption"].split("\n")[0] for entry in shown] == ["second picture <lora:style:0.5>",
                                                                     "first picture"]
    assert "Seed: 22" in shown[0]["caption"] and "Lora hashes" in shown[0]["caption"]
    assert [e["caption"].split("\n")[0] for e in other.predict(api_name="/history")] == ["someone else's picture"]
    url, session = adapter_app_server.url, mine.session_hash
    message, _ = call(url, "history_select", [None], session=session, event_data={"index": 0, "value": None})
    assert error_of(message) is None and "Seed: 22" in message["output"]["data"][0]
    message, _ = call(url, "history_send", [None], session=session)
    assert error_of(message) is None
    sent = sent_values(message["output"]["data"])
    assert sent["prompt"] == "second picture <lora:style:0.5>"
    assert (sent["seed"], sent["sampler"], sent["schedule_type"]) == (22, "dpmpp-2m", "Karras")


def test_png_info_sends_the_sampler_and_schedule_type_to_the_form(client, tmp_path):
    _, png, entry = generate(client, prompt="a green line", seed=31, sampler="euler", schedule_type="Exponential")
    assert (png.parameters["Sampler"], png.parameters["Schedule type"]) == ("Euler", "Exponential")
    client.predict(handle_file(entry["image"]), api_name="/png_info")  # fills this session's PNG fields
    sent = sent_values(client.predict(api_name="/png_info_send"))
    assert (sent["sampler"], sent["schedule_type"], sent["seed"]) == ("euler", "Exponential", 31)
    # an A1111 PNG written before 1.9: the schedule as a suffix of the sampler name
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    client.predict(handle_file(str(a1111)), api_name="/png_info")
    sent = sent_values(client.predict(api_name="/png_info_send"))
    assert (sent["sampler"], sent["schedule_type"]) == ("dpmpp-2m", "Karras")


NEW_ENDPOINTS = {  # api name -> inputs with `fd` in every slot a client controls (State slots are server-side)
    "txt2img_add_lora": lambda fd: [fd, fd, fd],
    "txt2img_add_embedding": lambda fd: [fd, fd, fd],
    "history": lambda fd: [fd],
    "history_select": lambda fd: [fd],
    "history_send": lambda fd: [fd],
    "png_info_send": lambda fd: [fd],
    "txt2img_refresh_lora": lambda fd: [fd],
}


@pytest.mark.parametrize("api_name", sorted(NEW_ENDPOINTS))
def test_the_file_read_attack_on_the_new_endpoints_reads_nothing(adapter_app_server, tmp_path, api_name):
    secret = secret_png(tmp_path / "secret.png")
    before = {str(p) for p in adapter_app_server.cache.rglob("*")}
    for path in ("/etc/hostname", str(secret)):
        message, raw = call(adapter_app_server.url, api_name, NEW_ENDPOINTS[api_name](file_data(path)),
                            session=f"attacker-{api_name}", event_data={"index": 0, "value": file_data(path)})
        assert SECRET not in raw and open("/etc/hostname").read().strip() not in raw and "Traceback" not in raw
        if api_name.startswith("txt2img_add"):  # text and choice inputs refuse a file
            assert "must be text" in error_of(message)
        else:  # a file in a State's or the LoRA menu's slot is refused unread (only this session's uploads are read)
            assert "only reads files uploaded in this session" in error_of(message) and path not in raw
    assert {str(p) for p in adapter_app_server.cache.rglob("*")} == before
    assert endpoints_taking_files(adapter_app_server.url) == set(FILE_ENDPOINTS)  # no new endpoint takes files


def test_a_request_waiting_behind_another_users_run_sees_its_queue_position(single_slot_app_server):
    first, second = (Client(single_slot_app_server.url, verbose=False) for _ in range(2))
    running = first.submit(*txt2img_args(steps=500, width=64, height=64, batch_count=64, seed=1), *HIRES_OFF, 0,
                           api_name="/txt2img")  # far longer than the test: it is cancelled at the end
    deadline = time.monotonic() + 120
    while running.status().code not in (Status.PROCESSING, Status.PROGRESS):  # it holds the only slot
        assert time.monotonic() < deadline, running.status()
        time.sleep(0.2)
    waiting = second.submit(*txt2img_args(seed=2), *HIRES_OFF, 0, api_name="/txt2img")
    try:
        while (status := waiting.status()).code != Status.IN_QUEUE or status.rank is None:
            assert time.monotonic() < deadline and not waiting.done(), status
            time.sleep(0.2)
        assert status.rank == 0 and status.queue_size >= 1, status  # first in line, behind the running one
    finally:
        first.predict(api_name="/txt2img_cancel")
    assert len(waiting.result(timeout=120)[0]) == 1
    assert re.search(r"seed \*\*2\*\*", waiting.result()[1])
