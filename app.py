"""Gradio web UI for the ldm toolkit: layout and callbacks only.

Every image is made by `ldm_pipeline` (the same code path as the `ldm-generate`
batch CLI); this module only turns form fields into pipeline calls and results
into gallery entries.

    python app.py                       # embedded default model on http://127.0.0.1:7860
    python app.py --model PATH          # any SD folder or single .safetensors file
    python app.py --host 0.0.0.0 --port 8000 --share   # only when you mean it
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import matplotlib

matplotlib.use("Agg")  # the server has no display; figures are rendered to images
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageChops  # noqa: E402

from custom_schedulers.schedules import alphas_cumprod_to_betas, named_schedules  # noqa: E402
from ldm_pipeline import GenerationCancelled, ModelLoadError, available_schedulers, load_pipeline, metadata  # noqa: E402
from ldm_pipeline.generate import prepare_schedulers  # noqa: E402
from ldm_pipeline.guidance import SCHEDULE_NAMES, as_interval  # noqa: E402
from ldm_pipeline.onnx_backend import long_running_backend  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
ACCURACY_TABLE = REPO_DIR / "docs" / "sampler_accuracy.md"

# ---------------------------------------------------------------- input limits

MAX_SIDE = 2048  # pixels; larger images do not fit a typical GPU at SD scale
MAX_STEPS = 500
MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 64
MAX_SEED = 2**32 - 1


def validate_request(
    prompt: str, sampler: str, samplers: list[str], steps: int, width: int, height: int,
    batch_size: int, batch_count: int, seed: int,
) -> None:
    """Check a text-to-image request before the model runs; raise ValueError naming the problem and the fix."""
    problems = []
    if not prompt or not prompt.strip():
        problems.append("The prompt is empty: type what the image should show.")
    if sampler not in samplers:
        problems.append(f"Unknown sampler {sampler!r}: choose one of {', '.join(samplers)}.")
    if not (isinstance(steps, int) or float(steps).is_integer()) or not 1 <= steps <= MAX_STEPS:
        problems.append(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {steps}.")
    for name, side in (("Width", width), ("Height", height)):
        if side % 8 or not 8 <= side <= MAX_SIDE:
            problems.append(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {side}.")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        problems.append(f"Batch size must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}: "
                        "use batch count for more images.")
    if not 1 <= batch_count <= MAX_BATCH_COUNT:
        problems.append(f"Batch count must be from 1 to {MAX_BATCH_COUNT}, got {batch_count}.")
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        problems.append(f"Seed must be -1 (random) or from 0 to {MAX_SEED}, got {seed}.")
    if problems:
        raise ValueError(" ".join(problems))


# ---------------------------------------------------------------- generation


@dataclass
class GenerationRequest:
    """One Generate click, every field already a Python value (see `request_from_form`)."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    guidance_schedule: str = "constant"
    guidance_min_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    guidance_rescale: float | None = None  # None = the pipeline's automatic choice
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_count: int = 1
    batch_size: int = 1
    image: object = None  # img2img / inpainting init image (PIL)
    mask_image: object = None  # inpainting mask (PIL, white = repaint)
    strength: float | None = None

    def seeds(self) -> list[list[int]]:
        """Seeds per batch: consecutive from the request's seed (a random one for -1)."""
        first = random.randrange(2**31) if self.seed == -1 else self.seed
        n = self.batch_size
        return [[first + b * n + j for j in range(n)] for b in range(self.batch_count)]

    def pipeline_options(self) -> dict:
        return dict(
            negative_prompt=self.negative_prompt or None, num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale, guidance_schedule=self.guidance_schedule,
            guidance_min_scale=self.guidance_min_scale, guidance_interval=self.guidance_interval,
            guidance_rescale=self.guidance_rescale, width=self.width, height=self.height,
            num_images_per_prompt=self.batch_size, image=self.image, mask_image=self.mask_image,
            strength=self.strength, progress_bar=False,
        )


def check_guidance(request: GenerationRequest) -> None:
    """The guidance fields the pipeline would reject, checked before the model runs."""
    if request.guidance_schedule not in SCHEDULE_NAMES:
        raise ValueError(f"Unknown guidance schedule {request.guidance_schedule!r}: choose one of "
                         f"{', '.join(SCHEDULE_NAMES)}.")
    as_interval(request.guidance_interval)  # raises ValueError naming the bounds
    if request.guidance_rescale is not None and not 0.0 <= request.guidance_rescale <= 1.0:
        raise ValueError(f"Guidance rescale must be from 0 to 1 (or -1 for automatic), got {request.guidance_rescale}.")
    if request.strength is not None and not 0.0 < request.strength <= 1.0:
        raise ValueError(f"Strength must be above 0 and at most 1, got {request.strength}.")


@dataclass
class Generator:
    """The model loaded once at start-up, shared by every request.

    Each request runs on its own shallow copy of the pipeline (same weights, its own
    scheduler instance and tokenizer), so concurrent requests never share sampler state.
    """

    pipe: object
    outputs: Path
    schedulers: dict = field(default_factory=dict)  # name -> prepared scheduler, or the error for this model
    stops: dict = field(default_factory=dict)  # session -> set of threading.Events of its running requests

    @classmethod
    def load(cls, model, outputs: Path, **load_options) -> "Generator":
        pipe = load_pipeline(model, **load_options)
        return cls(pipe, outputs, prepare_schedulers(pipe, set(available_schedulers())))

    @property
    def sampler_names(self) -> list[str]:
        """Usable samplers: the registry's short names first, then diffusers' stock classes."""
        usable = [name for name, s in self.schedulers.items() if name and not isinstance(s, Exception)]
        return sorted(usable, key=lambda name: (name[:1].isupper(), name))

    def request_pipe(self, sampler: str):
        """A pipeline sharing the loaded networks, with a fresh scheduler of the chosen kind."""
        prepared = self.schedulers[sampler]
        base = self.pipe
        pipe = type(base)(vae=base.vae, text_encoder=base.text_encoder, unet=base.unet,
                          tokenizer=copy.deepcopy(base.tokenizer),  # fast tokenizers are not thread-safe
                          scheduler=type(prepared).from_config(prepared.config))
        pipe.model_id, pipe.model_hash = base.model_id, base.model_hash
        return pipe

    def validate(self, request: GenerationRequest) -> None:
        validate_request(request.prompt, request.sampler, self.sampler_names, request.steps, request.width,
                         request.height, request.batch_size, request.batch_count, request.seed)
        check_guidance(request)

    def generate(self, request: GenerationRequest, on_step=None, stop: threading.Event | None = None) -> list[tuple[Path, dict]]:
        """Make every image of a request; returns (written PNG, recipe) pairs.

        `on_step(done, total)` reports progress; setting `stop` ends the run after the current step.
        """
        self.validate(request)
        pipe = self.request_pipe(request.sampler)
        self.outputs.mkdir(parents=True, exist_ok=True)
        batches = request.seeds()
        results, done = [], 0

        def callback(info) -> bool:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, info.num_steps * len(batches))
            return stop is not None and stop.is_set()

        for seeds in batches:
            try:
                out = pipe(request.prompt, seed=seeds, callback=callback, **request.pipeline_options())
            except GenerationCancelled:
                break  # keep the images of the batches already finished
            for image, recipe in zip(out.images, out.recipes):
                results.append((self.write(image, recipe), recipe))
        return results

    def write(self, image, recipe: dict) -> Path:
        """The PNG with the same embedded parameters as `ldm-generate` writes (atomic)."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-seed{recipe['seed']}.png"
        return metadata.write_png(self.outputs / name, image, recipe)


def caption(recipe: dict) -> str:
    """The gallery caption: the A1111 parameters line the PNG carries."""
    return metadata.format_parameters(recipe)


# ---------------------------------------------------------------- schedules tab


def vp_equivalent_alpha_bar(schedule) -> "torch.Tensor":  # noqa: F821
    """alpha-bar of the VP schedule with the same SNR: snr / (1 + snr) (equals alpha^2 for VP schedules)."""
    s = schedule.snr
    return s / (1 + s)


def _curve_style(name: str, names: list[str]) -> dict:
    """One colour per base schedule; variants (zero-terminal SNR, shift) of it dashed."""
    def base(n: str) -> str:
        return re.split(r" \+|,| \(", n)[0]

    bases = list(dict.fromkeys(base(n) for n in names))
    variant = re.search(r" \+|,", name) is not None
    return {"color": f"C{bases.index(base(name))}", "linestyle": "--" if variant else "-"}


def schedule_figures(num_train_timesteps: int = 1000) -> dict[str, plt.Figure]:
    """log-SNR(t), alpha-bar(t) and beta(t) for every named schedule, one figure each.

    Rectified flow is not variance preserving; its alpha-bar and beta are those of the
    VP schedule with the same SNR, so every curve is comparable on the same axes.
    """
    schedules = named_schedules(num_train_timesteps)
    curves = {"log-SNR(t)": {}, "alpha-bar(t)": {}, "beta(t)": {}}
    for name, schedule in schedules.items():
        abar = vp_equivalent_alpha_bar(schedule)
        curves["log-SNR(t)"][name] = schedule.log_snr
        curves["alpha-bar(t)"][name] = abar
        curves["beta(t)"][name] = alphas_cumprod_to_betas(abar)
    t = [i / (num_train_timesteps - 1) for i in range(num_train_timesteps)]
    figures = {}
    for title, by_name in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        for name, values in by_name.items():
            ax.plot(t, values.numpy(), label=name, linewidth=1.4, **_curve_style(name, list(schedules)))
        ax.set_xlabel("t / T  (0 = clean, 1 = pure noise)")
        ax.set_title(title)
        if title == "beta(t)":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        figures[title] = fig
        plt.close(fig)
    return figures


def accuracy_table_markdown(path: Path = ACCURACY_TABLE) -> str:
    """The sampler accuracy table written by `benchmarks/sampler_accuracy.py`, or a note saying how to make it."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return (
        f"_No sampler accuracy table yet: `{path.relative_to(REPO_DIR)}` is missing. "
        "Run `python benchmarks/sampler_accuracy.py` to write it._"
    )


# ---------------------------------------------------------------- layout and callbacks

SETTING_NAMES = (  # the generation settings every tab shares, in the order the callbacks receive them
    "prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "guidance_schedule", "guidance_min_scale",
    "use_interval", "sigma_lo", "sigma_hi", "guidance_rescale", "width", "height", "seed", "batch_count", "batch_size",
)


def request_from_form(values: dict) -> GenerationRequest:
    """A GenerationRequest from the shared settings (Gradio numbers arrive as floats; -1 means automatic/random)."""
    v = dict(values)
    bounds = (float(v.pop("sigma_lo")), float(v.pop("sigma_hi")))
    interval = bounds if v.pop("use_interval") else None
    rescale = float(v.pop("guidance_rescale"))
    ints = {k: _whole(k, v.pop(k)) for k in ("steps", "width", "height", "seed", "batch_count", "batch_size")}
    return GenerationRequest(**v, **ints, guidance_interval=interval, guidance_rescale=None if rescale < 0 else rescale)


def _whole(name: str, value) -> int | float:
    """An int if the number is whole; left fractional so validation names the field."""
    if value is None:
        raise ValueError(f"{name.replace('_', ' ').capitalize()} is empty: type a number.")
    return int(value) if float(value).is_integer() else float(value)


def settings_controls(samplers: list[str], native: int, prefix: str, recommended: dict) -> dict:
    """The shared settings widgets (prompt, sampler, guidance, size, seed, batch).

    Counts and sizes are plain numbers, not sliders: out-of-range values then reach
    `validate_request`, whose message names the field and the fix. Steps and guidance start from
    `recommended` (the model's record.json defaults, `pipe.recommended`).
    """
    c = {}
    c["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a blue background")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1)
    with gr.Row():
        c["sampler"] = gr.Dropdown(samplers, value=_default_sampler(samplers), label="Sampler",
                                   allow_custom_value=True)  # so an unknown name gets our message
        c["steps"] = gr.Number(value=recommended.get("num_inference_steps", 20), precision=0,
                               label=f"Steps (1-{MAX_STEPS})")
    with gr.Row():
        c["width"] = gr.Number(value=native, precision=0, label="Width (multiple of 8)")
        c["height"] = gr.Number(value=native, precision=0, label="Height (multiple of 8)")
    with gr.Row():
        c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id=f"{prefix}-seed")
        c["batch_count"] = gr.Number(value=1, precision=0, label="Batch count (batches one after another)")
        c["batch_size"] = gr.Number(value=1, precision=0, label=f"Batch size (images per batch, max {MAX_BATCH_SIZE})")
    with gr.Accordion("Guidance", open=False):
        with gr.Row():
            c["guidance_scale"] = gr.Slider(1.0, 30.0, value=recommended.get("guidance_scale", 7.5), step=0.5,
                                            label="Guidance scale (CFG)")
            c["guidance_rescale"] = gr.Number(value=-1, label="Guidance rescale phi (-1 = automatic)")
        with gr.Row():
            c["guidance_schedule"] = gr.Dropdown(list(SCHEDULE_NAMES), value="constant", label="Dynamic guidance")
            c["guidance_min_scale"] = gr.Number(value=1.0, label="Minimum scale of the ramps")
        with gr.Row():
            c["use_interval"] = gr.Checkbox(value=False, label="Guide only inside a noise-level interval")
            c["sigma_lo"] = gr.Number(value=0.28, label="sigma low (sigma_t / alpha_t)")
            c["sigma_hi"] = gr.Number(value=5.42, label="sigma high")
    return c


def _default_sampler(samplers: list[str]) -> str | None:
    for name in ("dpmpp-2m", "euler", "ddim"):
        if name in samplers:
            return name
    return samplers[0] if samplers else None


def output_controls(prefix: str) -> dict:
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate")
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
    gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id=f"{prefix}-gallery")
    info = gr.Markdown(elem_id=f"{prefix}-info")
    files = gr.File(label="Download PNGs (parameters embedded)", file_count="multiple")
    with gr.Row():
        reuse = gr.Button("Reuse seed of the selected image")
    return dict(generate=generate, cancel=cancel, gallery=gallery, info=info, files=files, reuse=reuse,
                seeds=gr.State([]), selected=gr.State(0))


def run_request(generator: Generator, request: GenerationRequest, session: str, progress) -> tuple:
    """Gallery entries, a Markdown summary, the file paths and the seeds; any failure -> gr.Error."""
    try:
        generator.validate(request)
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid request") from None
    stop = threading.Event()
    generator.stops.setdefault(session, set()).add(stop)
    try:
        results = generator.generate(request, on_step=lambda d, t: progress((d, t), unit="steps"), stop=stop)
    except Exception as error:  # shown to this user only; the server and other requests carry on
        raise gr.Error(f"Generation failed: {type(error).__name__}: {error}", title="Generation failed") from None
    finally:
        generator.stops.get(session, set()).discard(stop)
    if stop.is_set():
        gr.Warning(f"Cancelled: {len(results)} image(s) finished before the stop.")
    seeds = [recipe["seed"] for _, recipe in results]
    gallery = [(str(path), caption(recipe)) for path, recipe in results]
    summary = "\n".join(f"- `{path.name}`: seed **{recipe['seed']}**" for path, recipe in results)
    return gallery, summary, [str(p) for p, _ in results], seeds


def stop_session(generator: Generator, session: str) -> None:
    for event in list(generator.stops.get(session, ())):
        event.set()


def wire_outputs(generator: Generator, settings: dict, outputs: dict, extra_inputs: list, build, api_name: str):
    """Generate / Cancel / gallery selection / reuse seed for one tab.

    `build(values: dict, *extra) -> GenerationRequest` turns the form into a request.
    """
    names = list(SETTING_NAMES)
    inputs = [settings[n] for n in names] + extra_inputs

    # Gradio injects gr.Request and gr.Progress only into leading positional parameters.
    def on_generate(request: gr.Request, progress=gr.Progress(), *values):
        try:
            req = build(dict(zip(names, values[: len(names)])), *values[len(names):])
        except ValueError as error:
            raise gr.Error(str(error), title="Invalid request") from None
        return run_request(generator, req, request.session_hash, progress)

    event = outputs["generate"].click(
        on_generate, inputs=inputs,
        outputs=[outputs["gallery"], outputs["info"], outputs["files"], outputs["seeds"]], api_name=api_name,
    )
    def on_cancel(request: gr.Request):
        stop_session(generator, request.session_hash)  # the pipeline stops after its current step

    def on_select(evt: gr.SelectData):
        return evt.index

    def on_reuse(seeds, index, current):
        return seeds[index] if seeds and index < len(seeds) else current

    outputs["cancel"].click(on_cancel, inputs=None, outputs=None, cancels=[event], api_name=f"{api_name}_cancel")
    outputs["gallery"].select(on_select, inputs=None, outputs=outputs["selected"], api_name=False)
    outputs["reuse"].click(on_reuse, inputs=[outputs["seeds"], outputs["selected"], settings["seed"]],
                           outputs=settings["seed"], api_name=False)


def txt2img_request(values: dict) -> GenerationRequest:
    return request_from_form(values)


def img2img_request(values: dict, image, strength) -> GenerationRequest:
    if image is None:
        raise ValueError("No init image: upload the image to start from.")
    return replace_image(request_from_form(values), image.convert("RGB"), None, strength)


def inpaint_request(values: dict, editor, strength) -> GenerationRequest:
    """Init image = the editor's background; mask = everything painted on its layers (white = repaint)."""
    if not editor or editor.get("background") is None:
        raise ValueError("No image to inpaint: upload one, then paint over the part to repaint.")
    mask = painted_mask(editor)
    if mask.getbbox() is None:
        raise ValueError("The mask is empty: paint over the part of the image to repaint.")
    return replace_image(request_from_form(values), editor["background"].convert("RGB"), mask, strength)


def painted_mask(editor: dict):
    """A white-on-black L mask of every brush stroke in the editor's layers."""
    mask = Image.new("L", editor["background"].size, 0)
    for layer in editor.get("layers") or []:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        mask = ImageChops.lighter(mask, alpha.resize(mask.size))
    return mask


def replace_image(request: GenerationRequest, image, mask, strength) -> GenerationRequest:
    return replace(request, image=image, mask_image=mask, strength=float(strength))


def png_info(file) -> tuple[str, dict]:
    """The parameters text of an uploaded PNG and the txt2img fields they fill."""
    if file is None:
        return "", {}
    try:
        found = metadata.read_png(file)
    except Exception as error:
        return f"Cannot read this file as a PNG: {type(error).__name__}: {error}", {}
    if not found.parameters_text:
        return "This PNG carries no generation parameters.", {}
    fields = metadata.parameters_to_options(found.parameters)
    if found.recipe:
        fields.update({k: v for k, v in metadata.recipe_to_options(found.recipe).items() if v is not None})
    return found.parameters_text, fields


PNG_FIELDS = {  # pipeline option -> shared setting it fills
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale", "seed": "seed", "width": "width", "height": "height",
    "guidance_schedule": "guidance_schedule", "guidance_min_scale": "guidance_min_scale",
    "guidance_rescale": "guidance_rescale",
}


def fields_to_settings(fields: dict) -> list:
    """Updates for the txt2img settings (unchanged where the PNG says nothing), interval included."""
    values = {PNG_FIELDS[k]: v for k, v in fields.items() if k in PNG_FIELDS and v is not None}
    interval = fields.get("guidance_interval")
    if interval:
        values.update(use_interval=True, sigma_lo=interval.get("sigma_lo", 0.0), sigma_hi=interval.get("sigma_hi"))
    return [gr.update(value=values[n]) if n in values else gr.update() for n in SETTING_NAMES]


def build_ui(generator: Generator):
    samplers = generator.sampler_names
    native = generator.pipe.unet.config.sample_size * generator.pipe.vae_scale_factor
    recommended = getattr(generator.pipe, "recommended", {})  # pipelines not built by load_pipeline have none
    with gr.Blocks(title="ldm toolkit") as demo:
        gr.Markdown(f"## Latent diffusion\nModel: `{generator.pipe.model_id}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="txt2img"):
                txt = settings_controls(samplers, native, "txt2img", recommended)
                txt_out = output_controls("txt2img")
                wire_outputs(generator, txt, txt_out, [], txt2img_request, "txt2img")
            with gr.Tab("Image to image", id="img2img"):
                init = gr.Image(type="pil", label="Init image", image_mode="RGB")
                strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (1 = ignore the image)")
                img = settings_controls(samplers, native, "img2img", recommended)
                img_out = output_controls("img2img")
                wire_outputs(generator, img, img_out, [init, strength], img2img_request, "img2img")
            with gr.Tab("Inpainting", id="inpaint"):
                editor = gr.ImageEditor(type="pil", label="Image: paint over the part to repaint",
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                inpaint_strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength")
                inp = settings_controls(samplers, native, "inpaint", recommended)
                inp_out = output_controls("inpaint")
                wire_outputs(generator, inp, inp_out, [editor, inpaint_strength], inpaint_request, "inpaint")
            with gr.Tab("PNG info", id="pnginfo"):
                png_tab(txt, tabs)
            with gr.Tab("Schedules", id="schedules"):
                schedules_tab()
    return demo


def png_tab(txt_settings: dict, tabs) -> None:
    upload = gr.File(label="PNG written by this toolkit or by AUTOMATIC1111", file_types=[".png"])
    text = gr.Textbox(label="Parameters", lines=6, interactive=False)
    fields = gr.State({})
    send = gr.Button("Send to text to image")
    upload.change(png_info, inputs=upload, outputs=[text, fields], api_name="png_info")

    def on_send(found: dict):
        return [*fields_to_settings(found), gr.Tabs(selected="txt2img")]

    send.click(on_send, inputs=fields, outputs=[txt_settings[n] for n in SETTING_NAMES] + [tabs], api_name=False)


def schedules_tab() -> None:
    gr.Markdown("Noise schedules on a common axis (rectified flow via the VP schedule with the same SNR).")
    with gr.Row():
        for i, (title, figure) in enumerate(schedule_figures().items()):
            gr.Plot(figure, label=title, elem_id=f"schedule-plot-{i}")
    plot = ACCURACY_TABLE.with_suffix(".png")
    if plot.is_file():
        gr.Image(str(plot), label="Sampler accuracy", interactive=False, show_label=True)
    gr.Markdown(accuracy_table_markdown())


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldm-app", description="Gradio web UI for latent text-to-image diffusion.")
    parser.add_argument("--model", default=None,
                        help="SD diffusers folder or single .safetensors file (default: the embedded model). "
                             "Fixed at start-up; the browser cannot choose files.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the UI "
                             "to your network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"),
                        help="folder for the generated PNGs (default ./outputs)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="generations run at the same time; the rest wait in the queue (default 2)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="weights dtype (default: fp16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle checkpoints (.ckpt/.bin/.pt): only for files you trust")
    parser.add_argument("--trace", action="store_true",
                        help="torch.jit.trace the UNet once per image shape (faster steps on CPU; a few s per new shape)")
    parser.add_argument("--backend", default="auto", choices=["auto", "pytorch", "onnx"],
                        help="networks in PyTorch or ONNX Runtime (exported once per model); auto (default): the "
                             "fastest measured, ONNX Runtime on the CPU if installed, else the traced UNet")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        backend = ({"backend": args.backend, "trace": args.trace} if args.backend != "auto"
                   else long_running_backend(args.device, args.dtype, args.trace))
        generator = Generator.load(args.model, args.outputs.resolve(), device=args.device, dtype=args.dtype,
                                   allow_pickle=args.allow_pickle, **backend)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    demo = build_ui(generator)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
