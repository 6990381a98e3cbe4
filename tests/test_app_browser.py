"""The UI in a real browser: Debian's headless Chromium driven by Playwright against `python app.py`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def fill_number(page, label: str, value: int) -> None:
    field = page.get_by_label(label, exact=False).first
    field.fill(str(value))
    field.press("Tab")


def test_type_prompt_click_generate_and_see_the_image(app_server, chromium_context, artifacts_dir):
    page = chromium_context.new_page()
    try:
        page.goto(app_server.url, wait_until="domcontentloaded")
        page.get_by_label("Prompt").first.fill("a red circle on a blue background")
        fill_number(page, "Steps", 2)
        fill_number(page, "Width", 32)
        fill_number(page, "Height", 32)
        fill_number(page, "Seed", 4242)
        page.locator("#txt2img-generate").click()
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        page.locator("#txt2img-info").get_by_text("4242", exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(artifacts_dir / "txt2img.png"), full_page=True)
        # the browser really decoded the picture, at the requested size
        size = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
        assert size == [True, 32, 32]
        assert any(p.name.endswith("seed4242.png") for p in app_server.outputs.glob("*.png"))
    finally:
        page.close()
