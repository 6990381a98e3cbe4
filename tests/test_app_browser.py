"""The UI in a real browser: Debian's headless Chromium driven by Playwright against `python app.py`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]


def fill_number(page, label: str, value: int) -> None:
    field = page.get_by_label(label, exact=False).first
    field.fill(str(value))
    field.press("Tab")


def click_until_text(page, button: str, text: str, timeout: float) -> None:
    """Click `button` until the page shows `text`, waiting a few seconds after each click."""
    deadline = time.monotonic() + timeout
    while True:
        page.locator(button).click()
        try:
            page.wait_for_function(f"() => document.body.innerText.includes({text!r})", timeout=8_000)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared after clicking {button} for {timeout} s") from None


def open_txt2img(page, url: str, prompt: str, numbers: dict[str, int]) -> None:
    """Load the UI and fill the text-to-image form: the prompt, then each labelled number field."""
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Prompt").first.fill(prompt)
    for label, value in numbers.items():
        fill_number(page, label, value)


def test_type_prompt_click_generate_and_see_the_image(app_server, chromium_context, artifacts_dir):
    page = chromium_context.new_page()
    try:
        open_txt2img(page, app_server.url, "a red circle on a blue background",
                     {"Steps": 2, "Width": 32, "Height": 32, "Seed": 4242})
        page.locator("#txt2img-generate").click()
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        page.locator("#txt2img-info").get_by_text("4242", exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(artifacts_dir / "txt2img.png"), full_page=True)
        # the browser really decoded the picture, at the requested size
        size = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
        assert size == [True, 32, 32]
        assert any(p.name.endswith("seed4242.png") for p in app_server.outputs.glob("*.png"))
        # "Reuse seed": a random-seed run, then the used seed goes back into the form
        fill_number(page, "Seed", -1)
        page.locator("#txt2img-generate").click()
        page.locator("#txt2img-info").get_by_text("4242", exact=True).wait_for(state="detached", timeout=120_000)
        used = page.locator("#txt2img-info strong").first.inner_text(timeout=60_000)
        page.get_by_role("button", name="Reuse seed of the selected image").click()
        page.wait_for_function(f"() => document.querySelector('#txt2img-seed input').value === '{used}'",
                               timeout=30_000)
    finally:
        page.close()


def test_png_info_sends_parameters_to_txt2img_and_schedules_tab_shows_plots(
    app_server, chromium_context, artifacts_dir, tmp_path
):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a purple triangle\nNegative prompt: noisy\n"
                                "Steps: 3, Sampler: Euler a, CFG scale: 4.5, Seed: 31337, Size: 48x40")
    png = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    page = chromium_context.new_page()
    try:
        page.goto(app_server.url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="PNG info").click()
        upload = page.locator(".block", has_text="PNG written by this toolkit or by AUTOMATIC1111").first
        upload.wait_for(state="visible", timeout=60_000)
        upload.locator("input[type=file]").first.set_input_files(str(png))  # this tab's input, not another's
        page.get_by_label("Parameters").first.wait_for()
        page.wait_for_function("() => [...document.querySelectorAll('textarea')]"
                               ".some(t => t.value.startsWith('a purple triangle'))", timeout=30_000)
        page.get_by_role("button", name="Send to text to image").click()
        prompt = page.get_by_label("Prompt").first
        prompt.wait_for(state="visible")
        page.wait_for_function("() => [...document.querySelectorAll('textarea')]"
                               ".some(t => t.value === 'a purple triangle')", timeout=30_000)
        assert page.get_by_label("Seed (-1 = random)").first.input_value() == "31337"
        assert page.get_by_label("Width (multiple of 8)").first.input_value() == "48"
        page.screenshot(path=str(artifacts_dir / "png-info-sent.png"), full_page=True)
        page.get_by_role("tab", name="Schedules").click()
        page.get_by_text("Sampler accuracy").first.wait_for(timeout=30_000)
        for i in range(3):  # log-SNR, alpha-bar, beta: matplotlib figures rendered as images
            plot = page.locator(f"#schedule-plot-{i} img").first
            plot.wait_for(state="visible", timeout=30_000)
            assert plot.evaluate("img => img.complete && img.naturalWidth > 300")
        page.screenshot(path=str(artifacts_dir / "schedules.png"), full_page=True)
    finally:
        page.close()


def test_cancel_stops_a_long_run_and_the_form_works_again(app_server, chromium_context):
    def written() -> int:
        return len(list(app_server.outputs.glob("*.png")))

    page = chromium_context.new_page()
    try:
        open_txt2img(page, app_server.url, "a green square",
                     {"Steps": 100, "Width": 32, "Height": 32, "Seed": 777, "Batch count": 64})
        before = written()
        page.locator("#txt2img-generate").click()
        deadline = time.monotonic() + 120
        while written() == before and time.monotonic() < deadline:  # the run is under way: its first image is saved
            time.sleep(0.2)
        assert written() > before, "the long run never wrote its first image"
        page.locator("#txt2img-cancel").click()
        time.sleep(3)  # the pipeline stops after its current step
        settled = written()
        time.sleep(3)
        assert written() == settled < before + 64  # nothing more is written: the server really stopped
        # the same page generates again
        fill_number(page, "Steps", 2)
        fill_number(page, "Batch count", 1)
        fill_number(page, "Seed", 778)
        page.locator("#txt2img-generate").click()
        page.locator("#txt2img-info").get_by_text("778", exact=True).wait_for(timeout=120_000)
        assert written() == settled + 1
    finally:
        page.close()


def test_inpainting_with_a_mask_painted_by_mouse(fresh_app_server, chromium_context, artifacts_dir, tmp_path):
    from PIL import Image

    from ldm_pipeline import metadata

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (40, 80, 220)).save(init)
    page = chromium_context.new_page()
    try:
        page.goto(fresh_app_server.url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Inpainting").click()
        # the editor's own file input (the page has others, in tabs rendered or not), once the tab shows it
        editor = page.locator(".block", has_text="Image: paint over the part to repaint").first
        editor.wait_for(state="visible", timeout=60_000)
        editor.locator("input[type=file]").first.set_input_files(str(init))
        # the editor shows the upload (its "Upload an image" placeholder is gone) before any click: a click while
        # the file is still in flight loses the upload for good on a loaded machine
        editor.get_by_text("Upload an image").first.wait_for(state="hidden", timeout=120_000)
        # generating before painting is refused with the editor's message (once the upload has reached the
        # editor: a click while it is still uploading is answered "no image" or "wait", as for a user)
        click_until_text(page, "#inpaint-generate", "The mask is empty", timeout=120)
        page.get_by_role("button", name="Brush", exact=True).click()
        page.locator("canvas:visible").first.scroll_into_view_if_needed()
        canvas = page.locator("canvas:visible").first.bounding_box()  # viewport coordinates, as the mouse uses
        x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
        page.mouse.move(x - 40, y - 20)
        page.mouse.down()
        page.mouse.move(x + 40, y + 20, steps=10)
        page.mouse.up()
        page.locator("#inpaint-seed input").fill("9191")  # the tab's other settings keep their defaults
        page.locator("#inpaint-seed input").press("Tab")
        page.locator("textarea:visible").first.fill("a red circle")  # this tab's prompt
        page.locator("#inpaint-generate").click()
        page.locator("#inpaint-info").get_by_text("9191", exact=True).wait_for(timeout=120_000)
        page.screenshot(path=str(artifacts_dir / "inpaint.png"), full_page=True)
        written = [p for p in fresh_app_server.outputs.glob("*.png") if p.name.endswith("seed9191.png")]
        assert len(written) == 1
        recipe = metadata.read_png(written[0]).recipe
        assert (recipe["inpainting"], recipe["seed"]) == (True, 9191)
    finally:
        page.close()


def test_desktop_layout_generate_and_results_visible_and_images_shown_whole(
    app_server, chromium_context, artifacts_dir, tiny_model_dir
):
    """At 1400x900: Generate and the result gallery both in view without scrolling; a 64x64 image is
    displayed whole (object-fit contain, its box has the picture's aspect ratio, nothing clipped); the
    header names the model's folder, never its server path."""
    page = chromium_context.new_page()
    page.set_viewport_size({"width": 1400, "height": 900})
    try:
        open_txt2img(page, app_server.url, "a red circle", {"Steps": 2, "Width": 64, "Height": 64, "Seed": 6464})
        page.evaluate("() => window.scrollTo(0, 0)")
        header = page.locator("#model-header").inner_text()
        assert tiny_model_dir.name in header and str(tiny_model_dir) not in header
        assert page.locator("#txt2img-generate").is_visible()
        for element in ("#txt2img-generate", "#txt2img-gallery"):
            box = page.locator(element).bounding_box()
            assert box["y"] >= 0 and box["y"] + min(box["height"], 200) <= 900, (element, box)
            assert box["x"] >= 0 and box["x"] + box["width"] <= 1400, (element, box)
        generate, gallery = (page.locator(e).bounding_box() for e in ("#txt2img-generate", "#txt2img-gallery"))
        assert gallery["x"] > generate["x"] + generate["width"] / 2 or gallery["x"] > 600  # results on the right
        page.locator("#txt2img-generate").click()
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        page.locator("#txt2img-info").get_by_text("6464", exact=True).wait_for(timeout=30_000)
        shown = image.evaluate("""img => {
            const r = img.getBoundingClientRect(), s = getComputedStyle(img);
            let clipped = false;
            for (let p = img.parentElement; p && p !== document.body; p = p.parentElement) {
                const q = p.getBoundingClientRect(), o = getComputedStyle(p);
                if (o.overflow !== 'visible' && (r.left < q.left - 1 || r.right > q.right + 1 ||
                                                 r.top < q.top - 1 || r.bottom > q.bottom + 1)) clipped = [p.className, o.overflow, q.toJSON(), r.toJSON()];
            }
            return {natural: [img.naturalWidth, img.naturalHeight], box: [r.width, r.height],
                    fit: s.objectFit, rendering: s.imageRendering, clipped};
        }""")
        assert shown["natural"] == [64, 64]
        assert shown["fit"] == "contain" and shown["rendering"] == "pixelated"
        assert not shown["clipped"]
        assert shown["box"][0] > 64 and abs(shown["box"][0] / shown["box"][1] - 1.0) < 0.02  # scaled up, square
        page.screenshot(path=str(artifacts_dir / "layout-1400x900.png"))
        if os.environ.get("LDM_UPDATE_DOCS"):  # refresh the README's screenshot on request only
            page.screenshot(path=str(REPO_ROOT / "docs" / "ui.png"))
    finally:
        page.close()


def test_result_panel_shows_the_image_forming_during_a_30_step_run(app_server, chromium_context, artifacts_dir):
    page = chromium_context.new_page()
    try:
        open_txt2img(page, app_server.url, "a blue square",
                     {"Steps": 30, "Width": 64, "Height": 64, "Seed": 3030, "Preview interval": 5})
        page.evaluate("""() => {  // every picture the result panel shows, in order
            window.shown = [];
            const gallery = document.querySelector('#txt2img-gallery');
            const record = () => gallery.querySelectorAll('img').forEach(img => {
                const info = document.querySelector('#txt2img-info').innerText;
                if (window.shown.at(-1)?.src !== img.src) window.shown.push({src: img.src, info});
            });
            new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true});
        }""")
        page.locator("#txt2img-generate").click()
        page.locator("#txt2img-info").get_by_text("3030", exact=True).wait_for(timeout=180_000)
        shown = page.evaluate("() => window.shown")
        previews = [s["src"] for s in shown if "Preview" in s["info"]]
        assert len(set(previews)) >= 3, shown  # at least two changes before the final image
        assert "Preview" not in shown[-1]["info"] or "3030" in page.locator("#txt2img-info").inner_text()
        page.screenshot(path=str(artifacts_dir / "previews-final.png"))
    finally:
        page.close()
