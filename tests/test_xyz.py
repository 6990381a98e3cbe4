"""X/Y/Z plot: axis parsing and validation, grid layout, and grids of the tiny model run through GenerationService."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline import GenerationOptions, InvalidOptions, LatentTextToImagePipeline, metadata
from ldm_pipeline.image_grid import GridLayout, draw_grid, side_by_side
from ldm_pipeline.service import GenerationService, ServiceRequest, prepare_schedulers
from ldm_pipeline.xyz import AxisError, XYZPlot, run_plot
from training.tiny_models import tiny_sd_components

SMALL = dict(prompt="a red circle, blue background", width=32, height=32, seed=11, progress_bar=False)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec, values", [
    ("Steps: 10,20,30", (10, 20, 30)),
    ("steps:1-5", (1, 2, 3, 4, 5)),
    ("Steps: 1-5 (+2)", (1, 3, 5)),
    ("Steps: 10-1 (-3)", (10, 7, 4, 1)),
    ("Steps: 1-10 [4]", (1, 4, 7, 10)),  # A1111: np.linspace(1, 10, 4).astype(int)
    ("Steps: 2, 4-6", (2, 4, 5, 6)),
    ("CFG scale: 0.5-1.5 (+0.5)", (0.5, 1.0, 1.5)),
    ("CFG Scale: 1-2 [3], 7", (1.0, 1.5, 2.0, 7.0)),
    ("Seed: 5, 6", (5, 6)),
    ("Sampler: euler, DPM++ 2M Karras, EulerDiscreteScheduler", ("euler", "DPM++ 2M Karras", "EulerDiscreteScheduler")),
    ("Schedule type: Karras, sgm uniform", ("Karras", "sgm uniform")),
    ("Guidance schedule: constant, cosine", ("constant", "cosine")),
    ("Guidance interval: none, 0.28-5.42", (None, (0.28, 5.42))),
    ("LoRA weight: 0, 0.5", (0.0, 0.5)),
    ("CFG Rescale phi: 0, 0.7", (0.0, 0.7)),
    ("Guidance method: cfg, APG, cfg++, cfg-zero*", ("cfg", "apg", "cfg++", "cfg-zero*")),
    ("PAG scale: 0-3 [3]", (0.0, 1.5, 3.0)),
    ('Prompt S/R: red, "green, yellow", blue', (("red", "red"), ("red", "green, yellow"), ("red", "blue"))),
])
def test_axis_values_parse_as_a1111_writes_them(spec, values):
    assert XYZPlot.parse([spec]).axes[0].values == values


@pytest.mark.parametrize("specs, message", [
    (["Width: 32, 64"], "Unknown X/Y/Z axis 'Width': choose one of Sampler"),
    (["Steps 10, 20"], "write TYPE: VALUES"),
    (["Steps:"], "has no values"),
    (["Steps: 10, ten"], "'ten' is not a whole number or a range"),
    (["Steps: 2.5"], "only whole numbers"),
    (["Steps: 5-1 (+1)"], "never reaches its end"),
    (["Steps: 1-100000"], "at most 1000"),
    (["CFG scale: high"], "'high' is not a number"),
    (["Sampler: euler, Foo 3000"], "unknown sampler 'Foo 3000'"),
    (["Schedule type: Wobbly"], "unknown schedule type 'Wobbly'"),
    (["Guidance schedule: zigzag"], "unknown guidance schedule 'zigzag'"),
    (["Guidance interval: 0.3"], "write SIGMA_LO-SIGMA_HI"),
    (["Guidance method: cfg, smc"], "unknown guidance method 'smc'"),
    (["PAG scale: lots"], "'lots' is not a number"),
    (["Steps: 1, 2", "Seed: 1", "CFG scale: 1", "Steps: 3"], "1 to 3 axes"),
    (["Steps: 1, 2", "steps: 3"], "Two axes are both Steps"),
    ([], "1 to 3 axes"),
])
def test_bad_axes_are_refused_naming_the_problem(specs, message):
    with pytest.raises(AxisError, match=message.replace("(", r"\(").replace("+", r"\+")):
        XYZPlot.parse(specs)


def test_cells_run_x_fastest_and_apply_every_axis():
    plot = XYZPlot.parse(["Sampler: DPM++ 2M Karras, euler", "Prompt S/R: red, green", "CFG scale: 3, 4"])
    assert plot.shape == (2, 2, 2)
    assert plot.cells()[:3] == [(0, 0, 0), (1, 0, 0), (0, 1, 0)]
    base = ServiceRequest(GenerationOptions(prompt="a red circle", negative_prompt="red noise"))
    request = plot.request(base, (0, 1, 1))
    assert (request.sampler, request.schedule_type) == ("dpmpp-2m", "Karras")
    assert (request.options.prompt, request.options.negative_prompt) == ("a green circle", "green noise")
    assert request.options.guidance_scale == 4.0
    assert plot.cell_name((0, 1, 1)) == "Sampler: DPM++ 2M Karras, Prompt S/R: green, CFG scale: 4"
    assert plot.describe()[0] == {"type": "Sampler", "values": "DPM++ 2M Karras, euler"}


# ---------------------------------------------------------------- grid layout


def solid(color, size=(20, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def ink(image: Image.Image, box) -> int:
    """Non-white pixels in a box."""
    return int((np.asarray(image.crop(box).convert("L")) < 200).sum())


def test_grid_pastes_each_image_in_its_cell_under_its_labels():
    images = [[solid("red"), solid("blue")], [solid("green"), solid("black")]]
    layout = GridLayout.of((20, 16), ["Steps: 10", "Steps: 20"], ["Sampler: euler", "Sampler: ddim"])
    grid = draw_grid(images, layout)
    assert grid.size == layout.size
    assert layout.column_width > 20 and layout.label_width > 0  # labels wider than the tiny cells
    assert grid.size == (layout.label_width + 2 * layout.column_width, layout.label_height + 2 * 16)
    for r in range(2):
        for c in range(2):
            box = layout.cell_box(r, c)
            assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(images[r][c]))
            column = (layout.label_width + c * layout.column_width, 0,
                      layout.label_width + (c + 1) * layout.column_width, layout.label_height)
            assert ink(grid, column) > 20  # the column's label is drawn above it
        assert ink(grid, (0, box[1], layout.label_width, box[3])) > 20  # the row's label left of it
    assert ink(grid, (0, 0, layout.label_width, layout.label_height)) == 0  # the corner stays blank


def test_z_grids_stand_side_by_side_under_their_titles():
    layout = GridLayout.of((20, 16), ["Steps: 10"], [])
    grids = [draw_grid([[solid("red")]], layout), draw_grid([[solid("blue")]], layout)]
    stacked = side_by_side(grids, ["CFG scale: 3", "CFG scale: 7"], (20, 16))
    width, height = grids[0].size
    assert stacked.width > 2 * width and stacked.height > height
    title = stacked.height - height
    assert np.array_equal(np.asarray(stacked.crop((0, title, width, stacked.height))), np.asarray(grids[0]))
    assert ink(stacked, (0, 0, width, title)) > 20


# ---------------------------------------------------------------- grids of the tiny model


@pytest.fixture(scope="module")
def pipe():
    parts = tiny_sd_components()
    return LatentTextToImagePipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})


def service_in(pipe, folder) -> GenerationService:
    return GenerationService(pipe, folder, prepare_schedulers(pipe, {"euler", "ddim", "dpmpp-2m", "PNDMScheduler"}))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_2x2_grid_equals_each_cell_run_alone_and_is_labelled(pipe, tmp_path):
    service = service_in(pipe, tmp_path / "grid")
    plot = XYZPlot.parse(["Sampler: euler, ddim", "Steps: 2, 3"])
    progress = []
    result = run_plot(service, ServiceRequest(GenerationOptions(**SMALL)), plot,
                      on_progress=lambda *report: progress.append(report))
    assert not result.cancelled and len(result.cells) == 4
    assert progress[0] == (0, 4, 1, 2) and progress[-1] == (3, 4, 3, 3)  # (cell, cells, step, steps)
    alone = service_in(pipe, tmp_path / "alone")
    layout = GridLayout.of((32, 32), plot.axes[0].labels, plot.axes[1].labels)
    grid = Image.open(result.grid)
    assert grid.size == layout.size
    for (x, y, _), path, recipe in result.cells:
        request = ServiceRequest(GenerationOptions(**{**SMALL, "num_inference_steps": (2, 3)[y]}),
                                 sampler=("euler", "ddim")[x])
        (single, _), = alone.generate(request)
        assert np.array_equal(pixels(path), pixels(single))
        assert np.array_equal(np.asarray(grid.convert("RGB").crop(layout.cell_box(y, x))), pixels(single))
        assert metadata.read_png(path).recipe["steps"] == (2, 3)[y]
        assert ink(grid, (0, layout.cell_box(y, x)[1], layout.label_width, layout.cell_box(y, x)[3])) > 20
    found = metadata.read_png(result.grid)
    assert found.recipe["xyz"] == [{"type": "Sampler", "values": "euler, ddim"}, {"type": "Steps", "values": "2, 3"}]
    assert found.parameters["Script"] == "X/Y/Z plot"
    assert (found.parameters["X Type"], found.parameters["X Values"]) == ("Sampler", "euler, ddim")
    assert (found.parameters["Y Type"], found.parameters["Y Values"]) == ("Steps", "2, 3")


def test_guidance_method_cells_keep_only_their_own_parameters_and_equal_runs_alone(pipe, tmp_path):
    service = service_in(pipe, tmp_path / "grid")
    plot = XYZPlot.parse(["Guidance method: apg, cfg, cfg-zero*", "CFG rescale: 0, 0.5"])
    base = ServiceRequest(GenerationOptions(**SMALL, guidance_method="apg", apg_momentum=0.0), sampler="euler")
    assert plot.request(base, (1, 0, 0)).options.apg_momentum is None  # CFG refuses APG's parameters
    assert plot.request(base, (0, 0, 0)).options.apg_momentum == 0.0  # APG keeps them
    result = run_plot(service, base, plot)
    alone = service_in(pipe, tmp_path / "alone")
    images = {}
    for (x, y, _), path, recipe in result.cells:
        method, rescale = ("apg", "cfg", "cfg-zero*")[x], (0.0, 0.5)[y]
        changes = {"apg_momentum": 0.0} if method == "apg" else {}
        options = GenerationOptions(**SMALL, guidance_method=method, guidance_rescale=rescale, **changes)
        (single, _), = alone.generate(ServiceRequest(options, sampler="euler"))
        assert np.array_equal(pixels(path), pixels(single))
        written = (recipe["guidance"].get("method") or {"name": "cfg"})["name"]  # plain CFG is written as no method
        assert (written, recipe["guidance"]["rescale"]) == (method, rescale)
        images[x, y] = pixels(path)
    assert not np.array_equal(images[0, 0], images[1, 0]) and not np.array_equal(images[1, 0], images[1, 1])


def test_schedule_type_and_a1111_sampler_names_reach_the_scheduler(pipe, tmp_path):
    service = service_in(pipe, tmp_path)
    plot = XYZPlot.parse(["Schedule type: Karras, Exponential", "Sampler: euler, DPM++ 2M"])
    result = run_plot(service, ServiceRequest(GenerationOptions(**SMALL, num_inference_steps=2)), plot)
    written = {cell: metadata.read_png(path).parameters for cell, path, _ in result.cells}
    assert {(p["Sampler"], p["Schedule type"]) for p in written.values()} == {
        ("Euler", "Karras"), ("Euler", "Exponential"), ("DPM++ 2M", "Karras"), ("DPM++ 2M", "Exponential")}
    assert written[(0, 0, 0)]["Schedule type"] == "Karras"


def test_every_cell_is_checked_before_anything_runs(pipe, tmp_path):
    service = service_in(pipe, tmp_path)
    base = ServiceRequest(GenerationOptions(**SMALL))
    cases = [
        (["Steps: 2, 5000"], "Cell (Steps: 5000): Steps (num_inference_steps) must be a whole number from 1 to 999"),
        (["CFG scale: 2, 1000"], "Guidance scale (guidance_scale) must be a finite number from 0 to 100"),
        (["Prompt S/R: purple, green"], "Prompt S/R: 'purple' is not in the prompt"),
        (["LoRA weight: 0, 1"], "LoRA weight axis: no LoRA is loaded"),
        (["Sampler: euler, PNDMScheduler", "Schedule type: Karras"], "Schedule type 'Karras' with this sampler"),
    ]
    for specs, message in cases:
        with pytest.raises(InvalidOptions, match=message.replace("(", r"\(").replace(")", r"\)")):
            run_plot(service, base, XYZPlot.parse(specs))
    with pytest.raises(InvalidOptions, match="one image per cell"):
        run_plot(service, ServiceRequest(GenerationOptions(**SMALL), batch_count=2), XYZPlot.parse(["Steps: 2"]))
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_a_cancelled_grid_stops_within_a_step_and_leaves_only_complete_images(pipe, tmp_path):
    service = service_in(pipe, tmp_path)
    stop, steps_seen = threading.Event(), []

    def on_progress(cell, cells, step, steps):
        steps_seen.append((cell, step))
        if (cell, step) == (1, 2):
            stop.set()

    plot = XYZPlot.parse(["Steps: 3, 8", "Seed: 1, 2"])
    result = run_plot(service, ServiceRequest(GenerationOptions(**SMALL)), plot, on_progress=on_progress, stop=stop)
    assert result.cancelled and result.grid is None
    assert steps_seen[-1] == (1, 2)  # nothing ran after the step that asked to stop
    assert [cell for cell, _, _ in result.cells] == [(0, 0, 0)]
    files = sorted(tmp_path.iterdir())
    assert files == [result.cells[0][1]]  # one complete PNG, no grid, no temporary file
    assert metadata.read_png(files[0]).recipe["steps"] == 3


def test_a_random_seed_is_shared_by_every_cell(pipe, tmp_path):
    service = service_in(pipe, tmp_path)
    options = GenerationOptions(**{**SMALL, "seed": None, "num_inference_steps": 2})
    result = run_plot(service, ServiceRequest(options), XYZPlot.parse(["CFG scale: 1, 5"]))
    assert len({recipe["seed"] for _, _, recipe in result.cells}) == 1


def test_a_z_axis_puts_one_labelled_grid_per_value_side_by_side(pipe, tmp_path):
    service = service_in(pipe, tmp_path)
    plot = XYZPlot.parse(["Steps: 1, 2", "Seed: 3", "CFG scale: 1, 5"])
    result = run_plot(service, ServiceRequest(GenerationOptions(**SMALL)), plot)
    images = {cell: Image.open(path) for cell, path, _ in result.cells}
    layout = GridLayout.of((32, 32), plot.axes[0].labels, plot.axes[1].labels)
    first, second = (draw_grid([[images[(x, 0, z)] for x in range(2)]], layout) for z in range(2))
    expected = side_by_side([first, second], ["CFG scale: 1", "CFG scale: 5"], (32, 32))
    assert np.array_equal(np.asarray(Image.open(result.grid).convert("RGB")), np.asarray(expected))
    assert metadata.read_png(result.grid).parameters["Z Type"] == "CFG scale"
