"""X/Y/Z plot (AUTOMATIC1111's script): one image per combination of up to three axes' values, one labelled grid.

    plot = XYZPlot.parse(["Sampler: euler, DPM++ 2M Karras", "Steps: 10-30 (+10)"])   # X, then Y, then Z
    result = run_plot(service, ServiceRequest(GenerationOptions(prompt="a red circle", seed=5)), plot,
                      on_progress=lambda cell, cells, step, steps: ..., stop=threading.Event())
    result.grid, result.cells, result.cancelled

An axis is written as A1111's UI lists it: `TYPE: VALUES`, the values comma separated (CSV: quote a
value that holds a comma). Whole-number axes take ranges `1-5` (1, 2, 3, 4, 5), `1-9 (+4)` (1, 5, 9)
and `1-10 [3]` (3 values evenly spaced); number axes `0.5-1.5 (+0.5)` and `1-2 [3]`. Types (`AXES`):

    Sampler            registry names (`euler`, `dpmpp-2m`) or A1111 names (`Euler a`, `DPM++ 2M Karras`)
    Schedule type      A1111 schedule types (`Karras`, `Exponential`, `SGM Uniform`, `Automatic`, ...)
    Steps, CFG scale, Seed
    Guidance schedule  `constant`, `linear_up`, ... (`guidance.SCHEDULE_NAMES`)
    Guidance interval  `none` or `SIGMA_LO-SIGMA_HI`, e.g. `none, 0.28-5.42`
    CFG rescale        guidance rescale phi (`guidance_rescale`), e.g. `0, 0.7`
    Guidance method    `cfg`, `apg`, `cfg++`, `cfg-zero*` (each cell keeps only its own method's parameters)
    PAG scale          perturbed-attention guidance scale (0 = off)
    LoRA weight        the scale of the LoRAs already requested (`cross_attention_kwargs={"scale": w}`)
    Prompt S/R         the first value is searched for in the prompt (and negative prompt) and replaced
                       by each value in turn

Every cell is a `ServiceRequest` run by `GenerationService.generate` (one settings record, one
path). All cells are built and checked before the first image is made: a bad axis or value, or a
combination the model refuses, raises `InvalidOptions` naming it. A request without a seed gets one
random seed shared by every cell (a Seed axis sets it per cell). Cells run X fastest, then Y, then Z;
`stop` ends the run within one step and leaves only complete images; no grid is written then. The grid
(`image_grid`) is one PNG, written atomically, with the first cell's parameters plus A1111's
`Script: X/Y/Z plot, X Type: ..., X Values: ...` (recipe key "xyz"); a Z axis puts one grid per Z
value side by side, each under its title.
"""

from __future__ import annotations

import csv
import itertools
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from custom_schedulers import names, registry
from ldm_pipeline import metadata
from ldm_pipeline.guidance import SCHEDULE_ALIASES, SCHEDULE_NAMES
from ldm_pipeline.guidance_methods import METHODS, PARAMETERS
from ldm_pipeline.image_grid import GridLayout, draw_grid, side_by_side
from ldm_pipeline.options import InvalidOptions
from ldm_pipeline.service import GenerationService, ServiceRequest

MAX_AXES = 3
MAX_VALUES = 1000  # per axis, after ranges are expanded
# A1111's ranges (modules/xyz_grid.py): "1-5", "1-9 (+4)", "1-10 [3]"
NUMBER = r"[+-]?\s*\d+(?:\.\d*)?"
RE_STEP = re.compile(rf"^\s*({NUMBER})\s*-\s*({NUMBER})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\))?\s*$")
RE_COUNT = re.compile(rf"^\s*({NUMBER})\s*-\s*({NUMBER})\s*\[\s*(\d+)\s*\]\s*$")


class AxisError(InvalidOptions):
    """An axis that cannot be parsed: unknown type, bad value; the message names it and the fix."""


# ---------------------------------------------------------------- values


def split_values(text: str) -> list[str]:
    """Comma-separated values, CSV quoting allowed (A1111's `csv_string_to_list_strip`)."""
    row = next(csv.reader([text], skipinitialspace=True), [])
    return [value.strip() for value in row if value.strip()]


def _range(text: str, whole: bool) -> list[float] | None:
    """The values of a range `A-B`, `A-B (+S)` or `A-B [N]`, or None if `text` is not one."""
    count = RE_COUNT.match(text)
    if count:
        start, end, n = float(count[1].replace(" ", "")), float(count[2].replace(" ", "")), int(count[3])
        values = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start]
        return [int(v) for v in values] if whole else values
    stepped = RE_STEP.match(text)
    if not stepped:
        return None
    start, end = (float(g.replace(" ", "")) for g in stepped.groups()[:2])
    step = float(stepped[3].replace(" ", "")) if stepped[3] else (1.0 if end >= start else -1.0)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"the range {text!r} never reaches its end: give a step with the right sign, e.g. (+2)")
    n = int((end - start) / step + 1e-9) + 1
    if n > MAX_VALUES:
        raise ValueError(f"the range {text!r} has {n} values; at most {MAX_VALUES}")
    return [start + i * step for i in range(n)]


def _numbers(texts: list[str], whole: bool) -> list:
    values = []
    for text in texts:
        found = _range(text, whole)
        if found is None:
            try:
                found = [float(text)]
            except ValueError:
                kind = "a whole number" if whole else "a number"
                raise ValueError(f"{text!r} is not {kind} or a range such as 1-5, 1-9 (+2) or 1-10 [4]") from None
        if whole and any(v != int(v) for v in found):
            raise ValueError(f"{text!r}: only whole numbers here")
        values += [int(v) for v in found] if whole else [round(v, 10) for v in found]
    return values


def parse_whole(texts: list[str]) -> list[int]:
    return _numbers(texts, whole=True)


def parse_numbers(texts: list[str]) -> list[float]:
    return _numbers(texts, whole=False)


def sampler_of(text: str) -> tuple[str, str | None]:
    """(registry name, schedule type or None) of a registry name or an A1111 / ComfyUI sampler name."""
    if text in registry.available():
        return text, None
    found = names.resolve(text)
    if found is None:
        raise ValueError(f"unknown sampler {text!r}: use a registry name ({', '.join(registry.OURS)}) or an "
                         f"A1111 name ({', '.join(sorted(set(names.A1111_SAMPLERS.values())))})")
    return found


def parse_samplers(texts: list[str]) -> list[str]:
    for text in texts:
        sampler_of(text)
    return texts


def parse_schedule_types(texts: list[str]) -> list[str]:
    known = sorted({key.title() for key in names.SCHEDULES})
    for text in texts:
        if text.strip().lower() not in names.SCHEDULES:
            raise ValueError(f"unknown schedule type {text!r}: choose from {', '.join(known)}")
    return texts


def parse_guidance_schedules(texts: list[str]) -> list[str]:
    for text in texts:
        if text not in SCHEDULE_NAMES and text not in SCHEDULE_ALIASES:
            raise ValueError(f"unknown guidance schedule {text!r}: choose from {', '.join(SCHEDULE_NAMES)}")
    return texts


def parse_guidance_methods(texts: list[str]) -> list[str]:
    for text in texts:
        if text.lower() not in METHODS:
            raise ValueError(f"unknown guidance method {text!r}: choose from {', '.join(METHODS)}")
    return [text.lower() for text in texts]


def parse_intervals(texts: list[str]) -> list[tuple[float, float] | None]:
    values = []
    for text in texts:
        if text.lower() in ("none", "off"):
            values.append(None)
            continue
        match = RE_STEP.match(text)
        if not match or match[3]:
            raise ValueError(f"guidance interval {text!r}: write SIGMA_LO-SIGMA_HI (e.g. 0.28-5.42) or none")
        values.append((float(match[1].replace(" ", "")), float(match[2].replace(" ", ""))))
    return values


def parse_replacements(texts: list[str]) -> list[tuple[str, str]]:
    """Prompt S/R: (search, replacement) pairs; the first value is the search string (and the first cell)."""
    return [(texts[0], text) for text in texts]


# ---------------------------------------------------------------- what each axis changes


def _options(**changes) -> Callable[[ServiceRequest, Any], ServiceRequest]:
    (name,) = changes

    def apply(request: ServiceRequest, value) -> ServiceRequest:
        return replace(request, options=replace(request.options, **{name: changes[name](value, request.options)}))

    return apply


def _set_guidance_method(request: ServiceRequest, name: str) -> ServiceRequest:
    """The method, keeping the parameters given for it and dropping the other methods' (each applies only to its own)."""
    own = set(PARAMETERS.get(name, ()))
    dropped = {key: None for keys in PARAMETERS.values() for key in keys if key not in own}
    return replace(request, options=replace(request.options, guidance_method=name, **dropped))


def _set_sampler(request: ServiceRequest, text: str) -> ServiceRequest:
    name, schedule = sampler_of(text)
    return replace(request, sampler=name, schedule_type=schedule or request.schedule_type)


def _replace_prompt(request: ServiceRequest, pair: tuple[str, str]) -> ServiceRequest:
    search, value = pair
    options = request.options
    negative = options.negative_prompt
    return replace(request, options=replace(
        options, prompt=options.prompt.replace(search, value),
        negative_prompt=negative.replace(search, value) if isinstance(negative, str) else negative))


@dataclass(frozen=True)
class AxisType:
    """One kind of axis: its A1111 label, how its values parse, how a value changes a request."""

    label: str
    parse: Callable[[list[str]], list]
    apply: Callable[[ServiceRequest, Any], ServiceRequest]
    show: Callable[[Any], str] = str


AXES = {axis.label: axis for axis in (
    AxisType("Sampler", parse_samplers, _set_sampler),
    AxisType("Schedule type", parse_schedule_types, lambda request, text: replace(request, schedule_type=text)),
    AxisType("Steps", parse_whole, _options(num_inference_steps=lambda v, o: v)),
    AxisType("CFG scale", parse_numbers, _options(guidance_scale=lambda v, o: v), show=lambda v: f"{v:g}"),
    AxisType("Seed", parse_whole, _options(seed=lambda v, o: v)),
    AxisType("Guidance schedule", parse_guidance_schedules, _options(guidance_schedule=lambda v, o: v)),
    AxisType("Guidance interval", parse_intervals, _options(guidance_interval=lambda v, o: v),
             show=lambda v: "none" if v is None else f"{v[0]:g}-{v[1]:g}"),
    AxisType("CFG rescale", parse_numbers, _options(guidance_rescale=lambda v, o: v), show=lambda v: f"{v:g}"),
    AxisType("Guidance method", parse_guidance_methods, _set_guidance_method),
    AxisType("PAG scale", parse_numbers, _options(pag_scale=lambda v, o: v), show=lambda v: f"{v:g}"),
    AxisType("LoRA weight", parse_numbers,
             _options(cross_attention_kwargs=lambda v, o: {**(o.cross_attention_kwargs or {}), "scale": v}),
             show=lambda v: f"{v:g}"),
    AxisType("Prompt S/R", parse_replacements, _replace_prompt, show=lambda pair: pair[1]),
)}
ALIASES = {"cfg": "CFG scale", "guidance scale": "CFG scale", "sampler name": "Sampler", "scheduler": "Sampler",
           "schedule": "Schedule type", "lora scale": "LoRA weight", "prompt sr": "Prompt S/R",
           "cfg rescale phi": "CFG rescale", "guidance rescale": "CFG rescale"}
_BY_KEY = {**{label.lower(): label for label in AXES}, **ALIASES}


def axis_type(name: str) -> AxisType:
    label = _BY_KEY.get(" ".join(name.strip().lower().split()))
    if label is None:
        raise AxisError(f"Unknown X/Y/Z axis {name.strip()!r}: choose one of {', '.join(AXES)}.")
    return AXES[label]


# ---------------------------------------------------------------- axes and the plot


@dataclass(frozen=True)
class Axis:
    """One axis: its type, its values as typed (for the infotext) and parsed."""

    type: AxisType
    text: str
    values: tuple

    @classmethod
    def parse(cls, spec: str, letter: str = "X") -> "Axis":
        """`TYPE: VALUES`, e.g. "Steps: 10, 20" or "Prompt S/R: cat, dog"."""
        name, sep, text = spec.partition(":")
        if not sep:
            raise AxisError(f"{letter} axis {spec!r}: write TYPE: VALUES, e.g. 'Steps: 10, 20'.")
        kind = axis_type(name)
        texts = split_values(text)
        if not texts:
            raise AxisError(f"{letter} axis ({kind.label}) has no values: list them after the colon, "
                            f"e.g. '{kind.label}: ...,...'.")
        try:
            values = kind.parse(texts)
        except ValueError as error:
            raise AxisError(f"{letter} axis ({kind.label}): {error}.") from None
        if len(values) > MAX_VALUES:
            raise AxisError(f"{letter} axis ({kind.label}) has {len(values)} values; at most {MAX_VALUES}.")
        return cls(kind, text.strip(), tuple(values))

    @property
    def labels(self) -> list[str]:
        return [f"{self.type.label}: {self.type.show(value)}" for value in self.values]


@dataclass(frozen=True)
class XYZPlot:
    """Up to three axes: X (columns), Y (rows), Z (grids side by side)."""

    axes: tuple[Axis, ...]

    @classmethod
    def parse(cls, specs: list[str]) -> "XYZPlot":
        specs = [spec for spec in specs if spec and spec.strip()]
        if not 1 <= len(specs) <= MAX_AXES:
            raise AxisError(f"An X/Y/Z plot takes 1 to {MAX_AXES} axes (X, then Y, then Z), got {len(specs)}.")
        axes = tuple(Axis.parse(spec, letter) for spec, letter in zip(specs, "XYZ"))
        labels = [axis.type.label for axis in axes]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise AxisError(f"Two axes are both {twice[0]}: give each axis its own type.")
        return cls(axes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(columns, rows, grids)."""
        counts = [len(axis.values) for axis in self.axes]
        return tuple(counts + [1] * (MAX_AXES - len(counts)))

    def cells(self) -> list[tuple[int, int, int]]:
        """(x, y, z) indices in the order they run: X fastest, then Y, then Z."""
        nx, ny, nz = self.shape
        return [(x, y, z) for z, y, x in itertools.product(range(nz), range(ny), range(nx))]

    def request(self, base: ServiceRequest, cell: tuple[int, int, int]) -> ServiceRequest:
        for axis, index in zip(self.axes, cell):
            base = axis.type.apply(base, axis.values[index])
        return base

    def cell_name(self, cell: tuple[int, int, int]) -> str:
        return ", ".join(axis.labels[index] for axis, index in zip(self.axes, cell))

    def samplers(self) -> set[str]:
        """The registry names a Sampler axis asks for (to prepare only those)."""
        return {sampler_of(text)[0] for axis in self.axes if axis.type.label == "Sampler" for text in axis.values}

    def describe(self) -> list[dict]:
        """The recipe's "xyz" entry: each axis' type and values as typed (A1111's `X Type` / `X Values`)."""
        return [{"type": axis.type.label, "values": axis.text} for axis in self.axes]


# ---------------------------------------------------------------- checking and running


def cell_requests(service: GenerationService, base: ServiceRequest, plot: XYZPlot) -> list[ServiceRequest]:
    """Every cell's request, all checked before anything runs; InvalidOptions names each bad cell."""
    problems = base_problems(service, base, plot)
    if problems:
        raise InvalidOptions(" ".join(problems))
    if base.options.seed is None:  # one random seed for the whole grid, as A1111 fixes it
        base = replace(base, options=replace(base.options, seed=random.randrange(2**31)))
    requests = [plot.request(base, cell) for cell in plot.cells()]
    seen = set()
    for cell, request in zip(plot.cells(), requests):
        try:
            service.check(request)
        except ValueError as error:
            if str(error) not in seen:
                seen.add(str(error))
                problems.append(f"Cell ({plot.cell_name(cell)}): {error}")
    if problems:
        raise InvalidOptions(" ".join(problems))
    return requests


def base_problems(service: GenerationService, base: ServiceRequest, plot: XYZPlot) -> list[str]:
    """What the request itself must be for a plot: one image per cell, a text prompt, the S/R strings in it."""
    options, problems = base.options, []
    if base.batch_count != 1 or options.num_images_per_prompt != 1 or isinstance(options.seed, (list, tuple)):
        problems.append("An X/Y/Z plot makes one image per cell: set the batch count and images per prompt to 1 "
                        "and give one seed (or none).")
    for axis in plot.axes:
        if axis.type.label == "Prompt S/R":
            search = axis.values[0][0]
            texts = [t for t in (options.prompt, options.negative_prompt) if isinstance(t, str)]
            if not any(search in text for text in texts):
                problems.append(f"Prompt S/R: {search!r} is not in the prompt or the negative prompt; the first "
                                "value is the text to replace.")
        if axis.type.label == "LoRA weight" and not requests_lora(service, options):
            problems.append("LoRA weight axis: no LoRA is loaded; request one first (ldm-generate --lora or "
                            "<lora:NAME:W> with --lora-dir, the app's LoRA choice, or pipe.load_lora_weights).")
    return problems


def requests_lora(service: GenerationService, options) -> bool:
    """A LoRA named in the prompt (`<lora:NAME:W>`, served from the start-up folder) or loaded in the pipeline."""
    try:
        named = service.adapters.split_prompt(options.prompt)[1]
    except ValueError:  # a bad tag: the cell checks name it
        named = []
    return bool(named) or bool(getattr(service.pipe.unet, "peft_config", None))


@dataclass
class XYZResult:
    cells: list  # (cell (x, y, z), PNG path, recipe) of every finished cell, in run order
    grid: Path | None  # the grid PNG; None when the run was cancelled
    grid_image: Image.Image | None
    cancelled: bool


def run_plot(service: GenerationService, base: ServiceRequest, plot: XYZPlot, on_progress=None,
             stop: threading.Event | None = None) -> XYZResult:
    """Check every cell, make them one by one, write the grid (see module docstring).

    `on_progress(cell, cells, step, steps)` after every sampler step (cell is 0-based)."""
    requests = cell_requests(service, base, plot)
    finished = []
    for i, (cell, request) in enumerate(zip(plot.cells(), requests)):
        if stop is not None and stop.is_set():
            break
        report = None if on_progress is None else (lambda done, total, i=i: on_progress(i, len(requests), done, total))
        made = service.generate(request, on_step=report, stop=stop)
        if not made:  # cancelled during this cell: nothing of it was written
            break
        finished.append((cell, *made[0]))
    if len(finished) < len(requests):
        return XYZResult(finished, None, None, cancelled=True)
    image = grid_image(plot, {cell: Image.open(path) for cell, path, _ in finished})
    return XYZResult(finished, write_grid(service.outputs, image, finished[0][2], plot), image, cancelled=False)


def grid_image(plot: XYZPlot, images: dict) -> Image.Image:
    """One labelled grid per Z value (side by side under their titles when there is a Z axis)."""
    nx, ny, nz = plot.shape
    cell_size = next(iter(images.values())).size
    x_labels = plot.axes[0].labels
    y_labels = plot.axes[1].labels if len(plot.axes) > 1 else []
    layout = GridLayout.of(cell_size, x_labels, y_labels)
    grids = [draw_grid([[images[(x, y, z)] for x in range(nx)] for y in range(ny)], layout) for z in range(nz)]
    return grids[0] if len(plot.axes) < 3 else side_by_side(grids, plot.axes[2].labels, cell_size)


def write_grid(folder: Path, image: Image.Image, first_recipe: dict, plot: XYZPlot) -> Path:
    """The grid PNG (atomic), carrying the first cell's parameters and the axes (A1111's grid infotext)."""
    name = f"xyz-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.png"
    return metadata.write_png(Path(folder) / name, image, {**first_recipe, "xyz": plot.describe()})
