"""The X/Y/Z plot tab and the hires fix over HTTP: gradio_client against `python app.py` in a subprocess."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from test_app_server import txt2img_args

from ldm_pipeline import metadata

pytestmark = pytest.mark.slow

NO_HIRES = [False, 2.0, 0, 0.7, "Latent"]


@pytest.fixture(scope="module")
def client(app_server) -> Client:
    return Client(app_server.url, verbose=False)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def grid_args(*axes: str, hires=NO_HIRES, **form) -> list:
    """The txt2img settings and hires fix, then (type, values) for X, Y and Z ("Nothing" for the ones not given)."""
    pairs = [axes[i : i + 2] for i in range(0, len(axes), 2)]
    pairs += [("Nothing", "")] * (3 - len(pairs))
    return [*txt2img_args(**{"steps": 2, "seed": 5, **form}), *hires, *[v for pair in pairs for v in pair]]


def test_xyz_grid_of_two_samplers_by_two_step_counts(client):
    grid, info, gallery, files = client.predict(*grid_args("Sampler", "euler, ddim", "Steps", "2, 3"), api_name="/xyz")
    assert "X/Y/Z plot" in info and len(gallery) == 4 and len(files) == 5
    found = metadata.read_png(grid)
    assert (found.parameters["Script"], found.parameters["X Type"], found.parameters["Y Values"]) == (
        "X/Y/Z plot", "Sampler", "2, 3")
    assert Image.open(grid).width > 64 and Image.open(grid).height > 64
    cells = {(p["Sampler"], p["Steps"]): entry["image"] for entry in gallery
             for p in [metadata.read_png(entry["image"]).parameters]}
    assert set(cells) == {("Euler", "2"), ("Euler", "3"), ("DDIM", "2"), ("DDIM", "3")}
    assert [entry["caption"] for entry in gallery][:2] == ["Sampler: euler, Steps: 2", "Sampler: ddim, Steps: 2"]
    alone = client.predict(*txt2img_args(sampler="ddim", steps=3, seed=5), api_name="/txt2img")
    assert np.array_equal(pixels(cells[("DDIM", "3")]), pixels(alone[0][0]["image"]))


@pytest.mark.parametrize("axes, message", [
    (("Steps", "2, two"), "X axis (Steps): 'two' is not a whole number"),
    (("Sampler", "euler, Wobbly"), "unknown sampler 'Wobbly'"),
    (("Prompt S/R", "purple, green"), "Prompt S/R: 'purple' is not in the prompt"),
    (("Steps", "2, 5000"), "Cell (Steps: 5000)"),
    (("Nothing", "", "Steps", "2"), "Fill the axes in order: X first"),
    (("Nothing", ""), "1 to 3 axes"),
])
def test_a_bad_axis_is_refused_before_any_image(client, app_server, axes, message):
    before = set(app_server.outputs.glob("*")) if app_server.outputs.exists() else set()
    with pytest.raises(AppError) as refused:
        client.predict(*grid_args(*axes), api_name="/xyz")
    assert message in str(refused.value)
    assert (set(app_server.outputs.glob("*")) if app_server.outputs.exists() else set()) == before


def test_hires_fix_makes_the_upscaled_image_recorded_in_its_png(client):
    result = client.predict(*txt2img_args(seed=8, steps=3), True, 2.0, 2, 0.5, "Latent (nearest)", api_name="/txt2img")
    path = result[0][0]["image"]
    assert Image.open(path).size == (64, 64)
    found = metadata.read_png(path)
    assert found.recipe["hires"] == {"scale": 2.0, "steps": 2, "strength": 0.5, "upscaler": "Latent (nearest)"}
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)" in found.parameters_text
    plain = client.predict(*txt2img_args(seed=8, steps=3), *NO_HIRES, api_name="/txt2img")
    assert Image.open(plain[0][0]["image"]).size == (32, 32)


def test_a_grid_uses_the_text_to_image_hires_fix_in_every_cell(client):
    hires = [True, 2.0, 2, 0.5, "Latent (nearest)"]
    grid, info, gallery, _ = client.predict(*grid_args("Seed", "8, 9", hires=hires, steps=3), api_name="/xyz")
    assert len(gallery) == 2 and Image.open(grid).width >= 128  # two 64 px cells side by side
    for entry in gallery:
        assert Image.open(entry["image"]).size == (64, 64)
        assert metadata.read_png(entry["image"]).recipe["hires"]["upscaler"] == "Latent (nearest)"
    alone = client.predict(*txt2img_args(seed=8, steps=3), *hires, api_name="/txt2img")
    assert np.array_equal(pixels(gallery[0]["image"]), pixels(alone[0][0]["image"]))


def test_png_info_turns_the_hires_fix_on_with_the_pngs_values_and_off_without(client, tmp_path):
    from gradio_client import handle_file
    from PIL.PngImagePlugin import PngInfo

    from webui.form import SETTING_NAMES

    def sent_hires(text: str) -> list:
        png, info = tmp_path / "a1111.png", PngInfo()
        info.add_text("parameters", text)
        Image.new("RGB", (8, 8)).save(png, pnginfo=info)
        client.predict(handle_file(str(png)), api_name="/png_info")
        updates = client.predict(api_name="/png_info_send")
        start = len(SETTING_NAMES)  # the shared settings, then the hires fix accordion's five
        return [u.get("value") for u in updates[start : start + 5]]

    common = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32"
    assert sent_hires(common + ", Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 4, "
                      "Hires upscaler: Latent (nearest-exact)") == [True, 1.5, 4, 0.45, "Latent (nearest-exact)"]
    assert sent_hires(common) == [False, None, None, None, None]  # no hires pass: off, the rest untouched
    # an upscaler we do not have: the fix and its numbers still fill, the menu keeps its choice
    assert sent_hires(common + ", Denoising strength: 0.3, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+") == [
        True, 2.0, 0, 0.3, None]


@pytest.mark.parametrize("hires, message", [
    ([True, 1.0, 0, 0.5, "Latent"], "Hires upscale must be a number above 1"),
    ([True, 2.0, -2, 0.5, "Latent"], "Hires steps must be a whole number >= 0"),
    ([True, 20.0, 0, 0.5, "Latent"], "Hires upscale must be a number above 1 and at most 8"),
])
def test_bad_hires_settings_name_the_field(client, hires, message):
    with pytest.raises(AppError) as refused:
        client.predict(*txt2img_args(seed=8), *hires, api_name="/txt2img")
    assert message in str(refused.value)


def test_a_grid_reports_its_cells_and_cancel_keeps_only_finished_images(client, app_server):
    def grids() -> set:
        return set(app_server.outputs.glob("xyz-*.png"))

    def cells() -> set:
        return set(app_server.outputs.glob("*.png")) - grids()

    before_grids, before_cells = grids(), cells()
    job = client.submit(*grid_args("Seed", "1-8", "CFG scale", "3, 5", steps=100), api_name="/xyz")
    described = set()
    for _ in range(1200):  # the first cell is written, and the progress names the cell
        progress = job.status().progress_data or []
        described |= {unit.desc for unit in progress if unit.desc}
        if cells() - before_cells and described:
            break
        time.sleep(0.25)
    assert any(d.startswith("cell ") and d.endswith(" of 16") for d in described), described
    client.predict(api_name="/xyz_cancel")  # the same session: its grid stops within one step
    grid, info, gallery, files = job.result(timeout=300)
    assert grid is None and info.startswith("Cancelled after") and len(gallery) < 16
    made = cells() - before_cells
    assert len(made) == len(gallery) == len(files) and grids() == before_grids
    for path in made:  # complete PNGs with their recipes; no temporary file left
        assert metadata.read_png(path).recipe["steps"] == 100
    assert not list(app_server.outputs.glob(".*.tmp"))
