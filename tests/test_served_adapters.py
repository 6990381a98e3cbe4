"""LoRA sets on networks shared by concurrent requests (`ldm_pipeline.served_adapters`), on the tiny model:
the same set runs together, another set waits (and can be cancelled while it waits), images never mix."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline import GenerationOptions
from ldm_pipeline.service import GenerationService, ServiceRequest

STEP_WAIT = 60  # seconds a held run may wait for the test to release it


@pytest.fixture(scope="module")
def service(tiny_model_dir, adapter_folders, tmp_path_factory):
    return GenerationService.load(tiny_model_dir, tmp_path_factory.mktemp("served-outputs"), device="cpu",
                                  lora_dir=adapter_folders.loras, embedding_dir=adapter_folders.embeddings)


def request(prompt: str) -> ServiceRequest:
    return ServiceRequest(GenerationOptions(prompt=prompt, num_inference_steps=3, width=32, height=32, seed=9),
                          sampler="euler")


def pixels(results) -> np.ndarray:
    return np.asarray(Image.open(results[0][0])).astype(int)


def held_run(service, prompt: str, started: threading.Event, release: threading.Event, out: dict):
    """A thread generating `prompt` that pauses at its first step until `release` is set."""
    def on_step(done, total):
        started.set()
        release.wait(STEP_WAIT)

    thread = threading.Thread(target=lambda: out.setdefault(prompt, service.generate(request(prompt), on_step)))
    thread.start()
    return thread


def test_the_folders_offer_names_safetensors_only(service):
    assert service.adapters.lora_names() == ["style"]  # pickled.pt is not offered without allow_pickle
    assert service.adapters.embedding_names() == ["zorblax"]


def test_a_different_lora_set_waits_the_same_set_joins_and_a_waiting_request_can_be_cancelled(service):
    styled, plain = "a red circle <lora:style:0.7>", "a red circle"
    alone = {p: pixels(service.generate(request(p))) for p in (plain, styled)}
    release, out = threading.Event(), {}
    first_started, same_started, other_started = threading.Event(), threading.Event(), threading.Event()
    first = held_run(service, styled, first_started, release, out)
    assert first_started.wait(STEP_WAIT)
    same = held_run(service, styled + " ", same_started, release, out)  # the same set: runs alongside
    assert same_started.wait(STEP_WAIT)
    other = held_run(service, plain, other_started, release, out)  # another set: waits for both
    assert not other_started.wait(1.0)
    stop = threading.Event()
    cancelled = threading.Thread(target=lambda: out.setdefault("cancelled", service.generate(
        request(plain), stop=stop)))
    cancelled.start()
    stop.set()  # cancelled while it waits for its turn: returns at once, nothing made
    cancelled.join(STEP_WAIT)
    assert out["cancelled"] == [] and not other_started.is_set()
    release.set()
    for thread in (first, same, other):
        thread.join(STEP_WAIT)
    assert np.array_equal(pixels(out[styled]), alone[styled]) and np.array_equal(pixels(out[styled + " "]),
                                                                                 alone[styled])
    assert np.array_equal(pixels(out[plain]), alone[plain])
    assert out[plain][0][1].get("loras") is None and out[styled][0][1]["loras"][0]["scale"] == 0.7
