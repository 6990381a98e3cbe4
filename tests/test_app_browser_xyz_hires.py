"""X/Y/Z plot and hires fix in a real browser: headless Chromium (Playwright) against `python app.py`."""

from __future__ import annotations

import os

import pytest
from test_app_browser import REPO_ROOT, open_txt2img

from ldm_pipeline import metadata
from ldm_pipeline.image_grid import GridLayout

pytestmark = pytest.mark.slow


def natural_size(locator) -> list:
    return locator.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")


def keep_screenshot(page, artifacts_dir, name: str, docs: bool = False) -> None:
    """The whole page into the test artifacts; with LDM_UPDATE_DOCS set, the window into docs/ for the README."""
    page.screenshot(path=str(artifacts_dir / name), full_page=True)
    if docs and os.environ.get("LDM_UPDATE_DOCS"):
        page.screenshot(path=str(REPO_ROOT / "docs" / name))


def test_xyz_plot_of_two_samplers_by_two_step_counts_shows_a_labelled_grid(app_server, chromium_context,
                                                                             artifacts_dir):
    page = chromium_context.new_page()
    page.set_viewport_size({"width": 1400, "height": 900})
    try:
        open_txt2img(page, app_server.url, "a red circle on a blue background",
                     {"Steps": 2, "Width": 32, "Height": 32, "Seed": 5150})
        page.get_by_role("tab", name="X/Y/Z plot").click()
        for box, values in (("#xyz-x-values textarea", "euler, ddim"), ("#xyz-y-values textarea", "2, 3")):
            page.locator(box).fill(values)
            page.locator(box).press("Tab")
            page.wait_for_function(f"() => document.querySelector({box!r}).value === {values!r}")
        assert page.locator("#xyz-x-type input").input_value() == "Sampler"
        assert page.locator("#xyz-y-type input").input_value() == "Steps"
        page.locator("#xyz-generate").click()
        page.locator("#xyz-info").get_by_text("X/Y/Z plot", exact=False).wait_for(timeout=240_000)
        grid = page.locator("#xyz-grid img").first
        grid.wait_for(state="visible", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#xyz-grid img').complete", timeout=30_000)
        # the picture the browser shows is the 2x2 grid with its labels around the 32x32 cells
        layout = GridLayout.of((32, 32), ["Sampler: euler", "Sampler: ddim"], ["Steps: 2", "Steps: 3"])
        assert natural_size(grid) == [True, *layout.size]
        info = page.locator("#xyz-info").inner_text()
        assert "X: Sampler (euler, ddim); Y: Steps (2, 3)" in info
        assert page.locator("#xyz-gallery img").count() == 4
        keep_screenshot(page, artifacts_dir, "xyz-plot.png", docs=True)
        written = [p for p in app_server.outputs.glob("xyz-*.png") if metadata.read_png(p).recipe["seed"] == 5150]
        assert len(written) == 1
        assert metadata.read_png(written[0]).parameters["X Values"] == "euler, ddim"
    finally:
        page.close()


def test_hires_fix_makes_an_image_of_the_upscaled_size(app_server, chromium_context, artifacts_dir):
    page = chromium_context.new_page()
    try:
        open_txt2img(page, app_server.url, "a green square",
                     {"Steps": 2, "Width": 32, "Height": 32, "Seed": 6160, "Preview interval": 0})
        page.locator("#txt2img-hires").get_by_text("Hires fix", exact=True).click()
        box = page.locator("#txt2img-hires-on input[type=checkbox]")
        box.wait_for(state="visible", timeout=30_000)
        box.check()
        page.wait_for_function("() => document.querySelector('#txt2img-hires-on input').checked")
        scale = page.locator("#txt2img-hires-scale input")
        scale.fill("2")
        scale.press("Tab")
        page.locator("#txt2img-generate").click()
        page.locator("#txt2img-info").get_by_text("6160", exact=True).wait_for(timeout=240_000)
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(state="visible", timeout=30_000)
        page.wait_for_function("() => document.querySelector('#txt2img-gallery img').complete", timeout=30_000)
        assert natural_size(image) == [True, 64, 64]
        keep_screenshot(page, artifacts_dir, "hires-fix.png")
        written = [p for p in app_server.outputs.glob("*seed6160.png")]
        assert len(written) == 1 and metadata.read_png(written[0]).recipe["hires"]["scale"] == 2.0
    finally:
        page.close()
