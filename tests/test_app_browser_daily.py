"""The app as a daily tool in a real browser (headless Chromium via Playwright): a LoRA picked in the form,
the session's history sent back to the form, and the queue position while another user's run holds the slot."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image
from test_app_browser import fill_number, open_txt2img

from ldm_pipeline import metadata

pytestmark = pytest.mark.slow


def wait_until(check, what: str, timeout: float = 120.0):
    """Poll `check()` until it returns something truthy (and return it); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.25)
    return found


def finished_png(page, server, previous: str | None):
    """After a Generate click: wait until the result summary names a PNG other than `previous` (the run is
    over; the summary is only rewritten at the end), return that PNG's path in the server's outputs."""
    info = page.locator("#txt2img-info")

    def new_name():
        found = re.search(r"[\w\-]+\.png", info.inner_text())
        return found and found.group(0) != previous and found.group(0)

    name = wait_until(new_name, "a new result in the summary", timeout=180)
    page.locator("#txt2img-gallery img").first.wait_for(state="visible", timeout=60_000)
    return server.outputs / name


def test_a_lora_picked_in_the_form_changes_the_image_and_the_history_sends_it_back(
    adapter_app_server, chromium_context, artifacts_dir
):
    page = chromium_context.new_page()
    page.set_viewport_size({"width": 1400, "height": 900})
    prompt = page.get_by_label("Prompt").first
    try:
        open_txt2img(page, adapter_app_server.url, "a red circle",
                     {"Steps": 2, "Width": 32, "Height": 32, "Seed": 77, "Preview interval": 0})
        page.locator("#txt2img-generate").click()
        plain = finished_png(page, adapter_app_server, None)
        fill_number(page, "LoRA weight", 0.8)
        page.locator("#txt2img-add-lora").click()
        wait_until(lambda: prompt.input_value() == "a red circle <lora:style:0.8>", "the LoRA tag in the prompt")
        page.locator("#txt2img-generate").click()
        styled = finished_png(page, adapter_app_server, plain.name)
        page.screenshot(path=str(artifacts_dir / "lora-picked.png"))
        png = metadata.read_png(styled)
        a, b = (np.asarray(Image.open(p)).astype(int) for p in (plain, styled))
        assert np.abs(a - b).max() > 2  # the LoRA changed the image
        assert [r["name"] for r in png.recipe["loras"]] == ["style"] and png.recipe["loras"][0]["scale"] == 0.8
        assert "Lora hashes: " in png.parameters_text and png.parameters["Prompt"] == "a red circle <lora:style:0.8>"
        # the history: both results, newest first; the LoRA one goes back to the form
        prompt.fill("something else")
        page.get_by_role("tab", name="History").click()
        thumbnails = page.locator("#history-gallery .thumbnail-item")
        wait_until(lambda: thumbnails.count() == 2, "two results in the history")
        page.screenshot(path=str(artifacts_dir / "history.png"))
        thumbnails.first.click()
        parameters = page.locator("#history-parameters textarea")
        wait_until(lambda: "Lora hashes" in parameters.input_value(), "the selected result's parameters")
        page.locator("#history-send").click()
        wait_until(lambda: prompt.is_visible() and prompt.input_value() == "a red circle <lora:style:0.8>",
                   "the prompt sent back to text to image")
    finally:
        page.close()


def test_a_waiting_request_shows_its_queue_position(single_slot_app_server, chromium_context, artifacts_dir):
    """With one generation at a time, a second user's request shows "queue: 1/..." until the first is cancelled."""
    first, second = chromium_context.new_page(), chromium_context.new_page()
    try:
        open_txt2img(first, single_slot_app_server.url, "a long run",
                     {"Steps": 500, "Width": 64, "Height": 64, "Batch count": 64, "Preview interval": 0})
        first.locator("#txt2img-generate").click()
        first.wait_for_function("() => /\\d+\\/\\S+ steps/.test(document.body.innerText)",  # "131/32k steps"
                                timeout=120_000)
        open_txt2img(second, single_slot_app_server.url, "a short run",
                     {"Steps": 2, "Width": 32, "Height": 32, "Seed": 5150, "Preview interval": 0})
        second.locator("#txt2img-generate").click()
        second.wait_for_function("() => /queue: 1\\/\\d+/.test(document.body.innerText)", timeout=120_000)
        second.screenshot(path=str(artifacts_dir / "queue-position.png"))
        first.locator("#txt2img-cancel").click()
        second.locator("#txt2img-info").get_by_text("5150", exact=True).wait_for(timeout=180_000)
    finally:
        first.close()
        second.close()
