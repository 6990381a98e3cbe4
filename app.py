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
import concurrent.futures
import contextvars
import functools
import queue
from dataclasses import replace
from pathlib import Path

import gradio as gr
from PIL import Image, ImageChops

from custom_schedulers import names
from ldm_pipeline import GenerationOptions, ModelLoadError, metadata
from ldm_pipeline.guidance import SCHEDULE_NAMES
from ldm_pipeline.guidance_methods import METHODS, PARAMETERS, GuidanceMethod
from ldm_pipeline.hires import UPSCALERS, HiresFix, upscaler_name
from ldm_pipeline.loading import DEFAULT_MODEL_DIR, path_family
from ldm_pipeline.onnx_backend import long_running_backend
from ldm_pipeline.options import MAX_SIDE
from ldm_pipeline.plots import schedule_figures
from ldm_pipeline.previews import PREVIEW_MODES
from ldm_pipeline.service import GenerationService, ServiceRequest
from ldm_pipeline.web_inputs import protect_inputs, without_paths
from ldm_pipeline.xyz import AXES, AxisError, XYZPlot, run_plot

REPO_DIR = Path(__file__).resolve().parent
ACCURACY_TABLE = REPO_DIR / "docs" / "sampler_accuracy.md"

# ---------------------------------------------------------------- the form's own limits
# (every generation setting is checked by GenerationOptions.check, the same check as the CLI's and the API's)

MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 64
MAX_SEED = 2**32 - 1  # what the seed field offers; -1 = random
MAX_UPLOAD_PIXELS = 4 * MAX_SIDE**2  # an uploaded init image (it is resized to the requested size)
DEFAULT_PREVIEW_EVERY = 5  # the result panel shows the image forming every 5 steps (ldm_pipeline.previews)
MAX_UPLOAD_SIZE = "64mb"  # any uploaded file; Gradio refuses larger uploads
MAX_GRID_CELLS = 100  # images in one X/Y/Z plot
MAX_HISTORY = 100  # results a browser session keeps in its History tab (newest first)
GENERATION_QUEUE = "generation"  # every generating event shares one queue: --concurrency runs at a time in all
DEFAULTS = GenerationOptions()  # the settings record's own defaults, which the form starts from


def accuracy_table_markdown(path: Path = ACCURACY_TABLE) -> str:
    """The sampler accuracy table written by `benchmarks/sampler_accuracy.py`, or a note saying how to make it."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return (
        f"_No sampler accuracy table yet: `{path.relative_to(REPO_DIR)}` is missing. "
        "Run `python benchmarks/sampler_accuracy.py` to write it._"
    )


# ---------------------------------------------------------------- layout and callbacks

METHOD_FIELDS = ("guidance_method", "apg_eta", "apg_norm_threshold", "apg_momentum", "cfg_zero_init_steps",
                 "pag_scale", "pag_layers")  # the guidance method's form fields (`guidance_method_controls`)
SETTING_NAMES = (  # the generation settings every tab shares, in the order the callbacks receive them
    "prompt", "negative_prompt", "sampler", "schedule_type", "steps", "guidance_scale", "guidance_schedule", "guidance_min_scale",
    "use_interval", "sigma_lo", "sigma_hi", "guidance_rescale", "width", "height", "seed", "batch_count", "batch_size",
    *METHOD_FIELDS,
)
SDXL_SETTING_NAMES = (  # SDXL models only: the second encoder's prompts and the size conditioning (0 = the image's)
    "prompt_2", "negative_prompt_2", "original_height", "original_width", "crop_top", "crop_left", "target_height",
    "target_width",
)


def request_from_form(values: dict, image=None, mask_image=None, strength=None) -> ServiceRequest:
    """The shared settings as a ServiceRequest (Gradio numbers arrive as floats; -1 = automatic / random).

    Raises ValueError for what only the form limits (batch size and count, the seed field); the
    settings themselves are checked by `GenerationService.check`."""
    v = dict(values)
    interval = (float(v.pop("sigma_lo")), float(v.pop("sigma_hi"))) if v.pop("use_interval") else None
    numbers = {k: _whole(k, v.pop(k)) for k in ("steps", "width", "height", "seed", "batch_count", "batch_size")}
    form_problems(numbers)
    sdxl = sdxl_options({k: v.pop(k) for k in SDXL_SETTING_NAMES if k in v})
    rescale = float(v.pop("guidance_rescale"))
    options = GenerationOptions(
        prompt=v.pop("prompt"), negative_prompt=v.pop("negative_prompt") or None,
        num_inference_steps=numbers["steps"], width=numbers["width"], height=numbers["height"],
        seed=None if numbers["seed"] == -1 else numbers["seed"], num_images_per_prompt=numbers["batch_size"],
        guidance_interval=interval, guidance_rescale=None if rescale < 0 else rescale,
        image=image, mask_image=mask_image, strength=None if strength is None else float(strength),
        **{k: v.pop(k) for k in ("guidance_scale", "guidance_schedule", "guidance_min_scale")}, **sdxl,
        **method_options(v),
    )
    return ServiceRequest(options, sampler=v.pop("sampler"), batch_count=numbers["batch_count"],
                          schedule_type=v.pop("schedule_type") or None)


def sdxl_options(fields: dict) -> dict:
    """The SDXL fields as options: empty prompts = the first encoder's, sizes of 0 = the image's own."""
    if not fields:
        return {}
    n = {k: _whole(k, fields[k]) for k in SDXL_SETTING_NAMES[2:]}
    size = {name: (n[f"{name}_height"], n[f"{name}_width"]) for name in ("original", "target")}
    return dict(prompt_2=fields["prompt_2"] or None, negative_prompt_2=fields["negative_prompt_2"] or None,
                original_size=size["original"] if any(size["original"]) else None,
                crops_coords_top_left=(n["crop_top"], n["crop_left"]),
                target_size=size["target"] if any(size["target"]) else None)


def form_problems(numbers: dict) -> None:
    problems = []
    if numbers["batch_size"] != int(numbers["batch_size"]) or not 1 <= numbers["batch_size"] <= MAX_BATCH_SIZE:
        problems.append(f"Batch size must be from 1 to {MAX_BATCH_SIZE}, got {numbers['batch_size']}: "
                        "use batch count for more images.")
    if numbers["batch_count"] != int(numbers["batch_count"]) or not 1 <= numbers["batch_count"] <= MAX_BATCH_COUNT:
        problems.append(f"Batch count must be from 1 to {MAX_BATCH_COUNT}, got {numbers['batch_count']}.")
    if numbers["seed"] != -1 and not 0 <= numbers["seed"] <= MAX_SEED:
        problems.append(f"Seed must be -1 (random) or from 0 to {MAX_SEED}, got {numbers['seed']}.")
    if problems:
        raise ValueError(" ".join(problems))


def _whole(name: str, value) -> int | float:
    """An int if the number is whole; left fractional so the check names the field."""
    if value is None:
        raise ValueError(f"{name.replace('_', ' ').capitalize()} is empty: type a number.")
    return int(value) if float(value).is_integer() else float(value)


def prompt_controls(sdxl: bool) -> dict:
    c = dict(prompt=gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a blue background"),
             negative_prompt=gr.Textbox(label="Negative prompt", lines=1))
    if sdxl:  # SDXL's second text encoder (OpenCLIP bigG); empty = the prompt above
        c["prompt_2"] = gr.Textbox(label="Prompt 2 (second text encoder; empty = the prompt)", lines=1)
        c["negative_prompt_2"] = gr.Textbox(label="Negative prompt 2 (empty = the negative prompt)", lines=1)
    return c


def size_conditioning_controls() -> dict:
    """SDXL's micro-conditioning (original size, crop top-left, target size); 0 = the image's own size."""
    c = {}
    with gr.Accordion("Size conditioning (SDXL)", open=False):
        with gr.Row():
            c["original_height"] = gr.Number(value=0, precision=0, label="Original height (0 = image height)")
            c["original_width"] = gr.Number(value=0, precision=0, label="Original width (0 = image width)")
        with gr.Row():
            c["crop_top"] = gr.Number(value=0, precision=0, label="Crop top")
            c["crop_left"] = gr.Number(value=0, precision=0, label="Crop left")
        with gr.Row():
            c["target_height"] = gr.Number(value=0, precision=0, label="Target height (0 = image height)")
            c["target_width"] = gr.Number(value=0, precision=0, label="Target width (0 = image width)")
    return c


def settings_controls(samplers: list[str], native: int, prefix: str, recommended: dict, max_steps: int,
                      sdxl: bool = False) -> dict:
    """The shared settings widgets below the prompts (sampler, guidance, size, seed, batch).

    Counts and sizes are plain numbers, not sliders: out-of-range values then reach
    `GenerationOptions.check`, whose message names the field and the fix. Steps and guidance start from
    `recommended` (the model's record.json defaults, `pipe.recommended`).
    """
    c = {}
    with gr.Row():
        c["sampler"] = gr.Dropdown(samplers, value=_default_sampler(samplers), label="Sampler",
                                   allow_custom_value=True)  # so an unknown name gets our message
        c["schedule_type"] = gr.Dropdown(names.schedule_types(), value="Automatic", label="Schedule type",
                                         elem_id=f"{prefix}-schedule-type")
        c["steps"] = gr.Number(value=recommended.get("num_inference_steps", 20), precision=0,
                               label=f"Steps (1-{max_steps})")
    with gr.Row():
        c["width"] = gr.Number(value=native, precision=0, label="Width (multiple of 8)", info=f"at most {MAX_SIDE}")
        c["height"] = gr.Number(value=native, precision=0, label="Height (multiple of 8)", info=f"at most {MAX_SIDE}")
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
            c["guidance_schedule"] = gr.Dropdown(list(SCHEDULE_NAMES), value=DEFAULTS.guidance_schedule,
                                                 label="Dynamic guidance")
            c["guidance_min_scale"] = gr.Number(value=DEFAULTS.guidance_min_scale, label="Minimum scale of the ramps")
        with gr.Row():
            c["use_interval"] = gr.Checkbox(value=False, label="Guide only inside a noise-level interval")
            c["sigma_lo"] = gr.Number(value=0.28, label="sigma low (sigma_t / alpha_t)")
            c["sigma_hi"] = gr.Number(value=5.42, label="sigma high")
    c.update(guidance_method_controls())
    if sdxl:
        c.update(size_conditioning_controls())
    return c


def guidance_method_controls() -> dict:
    """The guidance method (APG, CFG++, CFG-Zero*) and its parameters, and perturbed-attention guidance."""
    c = {}
    with gr.Accordion("Guidance method", open=False):
        with gr.Row():
            c["guidance_method"] = gr.Dropdown(list(METHODS), value="cfg", label="Method",
                                               info="cfg++ takes a guidance scale of about 0.2-1 and a single-step "
                                                    "sampler (ddim, ddpm, euler, euler-a, rf-euler)")
            c["pag_scale"] = gr.Number(value=0.0, label="PAG scale (0 = off; about 3)")
            c["pag_layers"] = gr.Textbox(value="mid", label="PAG layers (comma separated, diffusers' names)")
        with gr.Row():
            defaults = GuidanceMethod()
            c["apg_eta"] = gr.Number(value=defaults.apg_eta, label="APG eta (parallel part)")
            c["apg_norm_threshold"] = gr.Number(value=defaults.apg_norm_threshold, label="APG norm threshold (0 = off)")
            c["apg_momentum"] = gr.Number(value=defaults.apg_momentum, label="APG momentum")
            c["cfg_zero_init_steps"] = gr.Number(value=defaults.cfg_zero_init_steps, precision=0,
                                                 label="CFG-Zero* zero-init steps")
    return c


def method_options(values: dict) -> dict:
    """The guidance-method options of the form: only the chosen method's parameters are sent (the others
    keep their fields' values but would be refused as not applying); absent fields keep the defaults."""
    form = {name: values.pop(name) for name in METHOD_FIELDS if name in values}
    method = form.get("guidance_method", "cfg")
    options = {"guidance_method": method, "pag_scale": float(form.get("pag_scale") or 0.0)}
    options.update({key: _whole(key, form[key]) if key == "cfg_zero_init_steps" else form[key]
                    for key in PARAMETERS.get(method, ()) if form.get(key) is not None})
    if "pag_layers" in form:
        options["pag_layers"] = [layer.strip() for layer in str(form["pag_layers"]).split(",")]
    return options


def _default_sampler(samplers: list[str]) -> str | None:
    for name in ("dpmpp-2m", "euler", "ddim"):
        if name in samplers:
            return name
    return samplers[0] if samplers else None


def action_buttons(prefix: str) -> dict:
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate")
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
        every = gr.Number(value=DEFAULT_PREVIEW_EVERY, precision=0, label="Preview interval (0 = off)",
                          elem_id=f"{prefix}-preview-every")
        mode = gr.Radio(list(PREVIEW_MODES), value="cheap", label="Preview (cheap approximation or full VAE decode)",
                        elem_id=f"{prefix}-preview-mode")
    return dict(generate=generate, cancel=cancel, preview_every=every, preview_mode=mode)


def result_controls(prefix: str) -> dict:
    """The result panel: whole images (contain, never cropped; see CSS), their seeds, the PNG downloads."""
    gallery = gr.Gallery(label="Images", columns=2, format="png", object_fit="contain", height=600,
                         elem_id=f"{prefix}-gallery", elem_classes=["result-gallery"])
    info = gr.Markdown(elem_id=f"{prefix}-info")
    files = gr.File(label="Download PNGs (parameters embedded)", file_count="multiple")
    with gr.Row():
        reuse = gr.Button("Reuse seed of the selected image")
    return dict(gallery=gallery, info=info, files=files, reuse=reuse, seeds=gr.State([]), selected=gr.State(0))


def generation_tab(service: GenerationService, form: dict, prefix: str, extra_inputs, build, history) -> dict:
    """Settings on the left (prompts and Generate on top), results on the right; the columns stack on
    narrow windows (min_width). `extra_inputs()` builds the tab's own inputs (init image, ...) below Generate.
    Results are added to the session's `history` (gr.State)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=420):
            settings = prompt_controls(form.get("sdxl", False))
            buttons = action_buttons(prefix)
            adapter_picker(service, settings["prompt"], prefix)
            extra = extra_inputs()
            settings.update(settings_controls(prefix=prefix, **form))
        with gr.Column(scale=6, min_width=420):
            outputs = {**buttons, **result_controls(prefix), "history": history}
    wire_outputs(service, settings, outputs, extra, build, prefix)
    return {**settings, "extra_inputs": extra}  # the tab's own inputs too: PNG info and X/Y/Z use txt2img's hires fix


def run_request(service: GenerationService, request: ServiceRequest, session: str, progress, preview: tuple,
                history: list):
    """Yields (gallery, summary, files, seeds, history): previews (`preview` = (every N steps or None, mode))
    while the run is under way (the generation runs in a worker thread), then the written images, also
    added to the session's `history`; any failure -> gr.Error."""
    try:
        service.check(request)
    except ValueError as error:
        raise gr.Error(without_paths(str(error)), title="Invalid request") from None
    stop, previews = service.register_stop(session), queue.Queue()
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = worker.submit(contextvars.copy_context().run,  # in the request's context, as gr.Progress needs
                               service.generate, request, on_step=lambda d, t: progress((d, t), unit="steps"),
                               stop=stop, on_preview=lambda *shown: previews.put(shown),
                               preview_every=preview[0], preview_mode=preview[1])
        while not future.done() or not previews.empty():
            try:
                step, total, images = previews.get(timeout=0.1)
            except queue.Empty:
                continue
            yield images, f"Preview: step {step} of {total}", gr.update(), gr.update(), gr.update()
        results = future.result()
    except GeneratorExit:  # the page left or the request was cancelled: stop the run after its current step
        stop.set()
        raise
    except Exception as error:  # shown to this user only; the server and other requests carry on
        raise gr.Error(f"Generation failed: {type(error).__name__}: {without_paths(str(error))}",
                       title="Generation failed") from None
    finally:
        worker.shutdown(wait=False)
        service.release_stop(session, stop)
    gallery, summary, served, seeds = finished_outputs(results, cancelled=stop.is_set())
    yield gallery, summary, served, seeds, remembered(history, gallery, [recipe for _, recipe in results])


def finished_outputs(results: list, cancelled: bool) -> tuple:
    if cancelled:
        gr.Warning(f"Cancelled: {len(results)} image(s) finished before the stop.")
    seeds = [recipe["seed"] for _, recipe in results]
    served = [served_copy(path) for path, _ in results]
    gallery = [(copy, metadata.format_parameters(recipe)) for copy, (_, recipe) in zip(served, results)]
    summary = "\n".join(f"- `{path.name}`: seed **{recipe['seed']}**" for path, recipe in results)
    return gallery, summary, served, seeds


def remembered(history: list | None, gallery: list, recipes: list) -> list:
    """The session's history with the new results first: {"image": served copy, "caption", "recipe"}, at most
    MAX_HISTORY (a gr.State: this browser session's own, kept by Gradio on the server)."""
    new = [{"image": image, "caption": caption, "recipe": recipe}
           for (image, caption), recipe in zip(gallery, recipes)]
    return (new[::-1] + list(history or []))[:MAX_HISTORY]


def served_copy(path: Path) -> str:
    """A written PNG copied into Gradio's cache, the one folder it serves: any --outputs folder works
    (Gradio refuses to copy from outside the working and temp folders) and is never served itself."""
    return gr.processing_utils.save_file_to_cache(path, cache_dir=gr.utils.get_upload_folder())


def wire_outputs(service: GenerationService, settings: dict, outputs: dict, extra_inputs: list, build, api_name: str):
    """Generate / Cancel / gallery selection / reuse seed for one tab.

    `build(values: dict, *extra) -> ServiceRequest` turns the form into a request.
    """
    names = [*SETTING_NAMES, *(n for n in SDXL_SETTING_NAMES if n in settings)]
    inputs = [settings[n] for n in names] + extra_inputs + [outputs[k] for k in ("preview_every", "preview_mode")]

    # Gradio injects gr.Request and gr.Progress only into leading positional parameters.
    def on_generate(request: gr.Request, progress=gr.Progress(), *values):
        *values, every, mode, history = values
        try:
            req = build(dict(zip(names, values[: len(names)])), *values[len(names):])
        except ValueError as error:
            raise gr.Error(str(error), title="Invalid request") from None
        yield from run_request(service, req, request.session_hash, progress, (preview_steps(every), mode), history)

    event = outputs["generate"].click(
        on_generate, inputs=[*inputs, outputs["history"]],
        outputs=[outputs[k] for k in ("gallery", "info", "files", "seeds", "history")], api_name=api_name,
        concurrency_id=GENERATION_QUEUE,
    )
    def on_cancel(request: gr.Request):
        service.stop_session(request.session_hash)  # the pipeline stops after its current step

    def on_select(evt: gr.SelectData):
        return evt.index

    def on_reuse(seeds, index, current):
        return seeds[index] if seeds and index < len(seeds) else current

    outputs["cancel"].click(on_cancel, inputs=None, outputs=None, cancels=[event], api_name=f"{api_name}_cancel")
    outputs["gallery"].select(on_select, inputs=None, outputs=outputs["selected"], api_name=False)
    outputs["reuse"].click(on_reuse, inputs=[outputs["seeds"], outputs["selected"], settings["seed"]],
                           outputs=settings["seed"], api_name=False)


def preview_steps(value) -> int | None:
    """The form's 'preview every N steps' (0 or empty = off)."""
    if value in (None, "") or float(value) <= 0:
        return None
    if not float(value).is_integer():
        raise gr.Error(f"Preview every N steps must be a whole number, got {value}.", title="Invalid request")
    return int(value)


def txt2img_request(values: dict, hires_on=False, scale=2.0, steps=0, strength=0.7, upscaler="Latent",
                    refiner_on=False, switch_at=0.8) -> ServiceRequest:
    """The shared settings, with the hires fix and the refiner when their boxes are ticked (their values checked
    by GenerationOptions and the service)."""
    request = request_from_form(values)
    for label, ticked in (("Hires fix", hires_on), ("Refiner", refiner_on)):
        if not isinstance(ticked, bool):
            raise ValueError(f"{label} must be on or off (true or false), got {ticked!r}.")
    if refiner_on:
        request = replace(request, refiner_switch_at=switch_at)
    if not hires_on:
        return request
    hires = HiresFix(scale=scale, steps=_whole("hires_steps", steps), strength=strength, upscaler=upscaler)
    return replace(request, options=replace(request.options, hires=hires))


def txt2img_inputs(refiner: bool) -> list:
    """The Text to image tab's own inputs: the hires fix, and the refiner when the app has one (--refiner)."""
    return hires_inputs() + (refiner_inputs() if refiner else [])


def refiner_inputs() -> list:
    """The Refiner accordion (SDXL, --refiner): on/off and A1111's "Switch at" (the fraction the base runs)."""
    with gr.Accordion("Refiner", open=False, elem_id="txt2img-refiner"):
        on = gr.Checkbox(value=False, label="Refiner: the SDXL refiner finishes the image", elem_id="txt2img-refiner-on")
        switch_at = gr.Slider(0.05, 0.95, value=0.8, step=0.05, label="Switch at (fraction of the steps the base runs)",
                              elem_id="txt2img-refiner-switch")
    return [on, switch_at]


def hires_inputs() -> list:
    """The txt2img tab's Hires fix accordion (ldm_pipeline.hires): on/off, factor, upscaler, steps, strength."""
    with gr.Accordion("Hires fix", open=False, elem_id="txt2img-hires"):
        on = gr.Checkbox(value=False, label="Hires fix: upscale, then refine with an img2img pass",
                         elem_id="txt2img-hires-on")
        with gr.Row():
            scale = gr.Number(value=2.0, label="Upscale by", elem_id="txt2img-hires-scale")
            upscaler = gr.Dropdown(list(UPSCALERS), value="Latent", label="Upscaler")
        with gr.Row():
            steps = gr.Number(value=0, precision=0, label="Hires steps (0 = the base steps)")
            strength = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Denoising strength")
    return [on, scale, steps, strength, upscaler]


def img2img_request(values: dict, image, strength) -> ServiceRequest:
    if image is None:
        raise ValueError("No init image: upload the image to start from.")
    return request_from_form(values, image=image, strength=strength)


def inpaint_request(values: dict, editor, strength) -> ServiceRequest:
    """Init image = the editor's background; mask = everything painted on its layers (white = repaint)."""
    if not editor or editor.get("background") is None:
        raise ValueError("No image to inpaint: upload one, then paint over the part to repaint.")
    mask = painted_mask(editor)
    if mask.getbbox() is None:
        raise ValueError("The mask is empty: paint over the part of the image to repaint.")
    return request_from_form(values, image=editor["background"], mask_image=mask, strength=strength)


def painted_mask(editor: dict):
    """A white-on-black L mask of every brush stroke in the editor's layers."""
    mask = Image.new("L", editor["background"].size, 0)
    for layer in editor.get("layers") or []:
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        mask = ImageChops.lighter(mask, alpha.resize(mask.size))
    return mask


def png_info(file) -> tuple[str, dict]:
    """The parameters text of an uploaded PNG and the txt2img fields they fill."""
    if file is None:
        return "", {}
    try:
        found = metadata.read_png(file)
    except Exception as error:
        return f"Cannot read this file as a PNG ({type(error).__name__}): upload a PNG image.", {}
    if not found.parameters_text:
        return "This PNG carries no generation parameters.", {}
    try:
        return found.parameters_text, form_fields(found.parameters, found.recipe)
    except ValueError as error:  # a recipe that cannot replay (custom guidance function, generator-drawn noise)
        return (f"{found.parameters_text}\n\n{error} The settings come from the parameters text.",
                form_fields(found.parameters, None))


def form_fields(parameters: dict | None, recipe: dict | None) -> dict:
    """The txt2img fields that A1111 parameters (ours or A1111's) and our recipe, if any, fill: the prompt
    with its `<lora:NAME:W>` tags, the sampler and schedule type too."""
    fields = {**metadata.parameters_to_options(parameters), **schedule_type_field(parameters)} if parameters else {}
    if recipe:
        fields.update({k: v for k, v in metadata.recipe_to_options(recipe).items() if v is not None})
        fields["prompt"] = metadata.prompt_with_lora_tags(recipe)
    if parameters and "Refiner switch at" in parameters:  # the app's refiner, not a pipeline option
        fields["refiner_switch_at"] = float(parameters["Refiner switch at"])
    return fields


def schedule_type_field(parameters: dict) -> dict:
    """{"schedule_type": the form's choice} for A1111's `Schedule type` or a ` Karras` sampler suffix
    (`names.resolve`); "Automatic" (the sampler's own) for one we do not have."""
    found = names.resolve(parameters["Sampler"], parameters.get("Schedule type")) if "Sampler" in parameters else None
    if found is None:
        return {}
    choices = {choice.lower(): choice for choice in names.schedule_types()}
    return {"schedule_type": choices.get((found[1] or "Automatic").lower(), "Automatic")}


PNG_FIELDS = {  # pipeline option -> shared setting it fills
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale", "seed": "seed", "width": "width", "height": "height",
    "guidance_schedule": "guidance_schedule", "guidance_min_scale": "guidance_min_scale",
    "guidance_rescale": "guidance_rescale", "scheduler": "sampler", "schedule_type": "schedule_type",
    **{name: name for name in METHOD_FIELDS},
    "prompt_2": "prompt_2", "negative_prompt_2": "negative_prompt_2",
}
SDXL_PAIR_FIELDS = {"original_size": ("original_height", "original_width"), "target_size": ("target_height", "target_width"),
                    "crops_coords_top_left": ("crop_top", "crop_left")}


def fields_to_settings(fields: dict, names=SETTING_NAMES) -> list:
    """Updates for the txt2img settings `names` (unchanged where the PNG says nothing), interval and SDXL included."""
    values = {PNG_FIELDS[k]: v for k, v in fields.items() if k in PNG_FIELDS and v is not None}
    if isinstance(values.get("pag_layers"), list):
        values["pag_layers"] = ", ".join(values["pag_layers"])
    interval = fields.get("guidance_interval")
    if interval:
        values.update(use_interval=True, sigma_lo=interval.get("sigma_lo", 0.0), sigma_hi=interval.get("sigma_hi"))
    for option, (first, second) in SDXL_PAIR_FIELDS.items():
        if fields.get(option) is not None:
            values.update({first: fields[option][0], second: fields[option][1]})
    return [gr.update(value=values[n]) if n in values else gr.update() for n in names]


CSS = """
.result-gallery img { object-fit: contain !important; image-rendering: pixelated; }
.result-gallery .thumbnail-item { max-width: 500px; max-height: 500px; margin: auto; }
.history-gallery img { object-fit: contain !important; image-rendering: pixelated; }
.history-gallery .thumbnail-item { max-width: 160px; max-height: 160px; }
"""  # whole images, never cropped; small ones scaled up with visible pixels (nearest neighbour)


def model_header(pipe) -> str:
    """The model's name (its folder's name, never a server path) and recommended settings, once."""
    path = Path(pipe.model_id)
    name = "embedded default model" if path.resolve() == DEFAULT_MODEL_DIR.resolve() else path.name
    recommended = getattr(pipe, "recommended", {}) or {}
    settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in recommended.items())
    return f"## Latent diffusion\n**Model:** {name}" + (f" · recommended: {settings}" if settings else "")


def build_ui(service: GenerationService):
    native = service.pipe.unet.config.sample_size * service.pipe.vae_scale_factor
    form = dict(samplers=service.sampler_names, native=native, max_steps=service.pipe.limits().max_steps,
                recommended=getattr(service.pipe, "recommended", {}), sdxl=service.pipe.limits().family == "sdxl")  # pipelines not built by load_pipeline have none
    with gr.Blocks(title="ldm toolkit", css=CSS) as demo:
        gr.Markdown(model_header(service.pipe), elem_id="model-header")
        history = gr.State([])  # this browser session's results, newest first (see `remembered`)
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="txt2img"):
                txt = generation_tab(service, form, "txt2img", functools.partial(txt2img_inputs, service.refiner is not None),
                                     txt2img_request, history)
            with gr.Tab("Image to image", id="img2img"):
                generation_tab(service, form, "img2img", img2img_inputs, img2img_request, history)
            with gr.Tab("Inpainting", id="inpaint"):
                generation_tab(service, form, "inpaint", inpaint_inputs, inpaint_request, history)
            with gr.Tab("X/Y/Z plot", id="xyz"):
                xyz_tab(service, txt)
            with gr.Tab("PNG info", id="pnginfo"):
                png_tab(txt, tabs)
            with gr.Tab("History", id="history") as history_page:
                history_tab(history_page, history, txt, tabs)
            with gr.Tab("Schedules", id="schedules"):
                schedules_tab()
    protect_inputs(demo, MAX_UPLOAD_PIXELS)  # every file input: only this session's uploads; values typed
    return demo


def img2img_inputs() -> list:
    init = gr.Image(type="pil", label="Init image", image_mode=None)  # options.as_rgb converts any mode
    return [init, gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (1 = ignore the image)")]


def inpaint_inputs() -> list:
    editor = gr.ImageEditor(type="pil", label="Image: paint over the part to repaint",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
    return [editor, gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength")]


def xyz_tab(service: GenerationService, txt_settings: dict) -> None:
    """Up to three axes (types from ldm_pipeline.xyz.AXES) over the Text to image settings; one labelled grid."""
    gr.Markdown("Uses the **Text to image** settings; each axis sets one of them per cell. Values are comma "
                "separated; numbers also take ranges: `10-30 (+10)`, `1-10 [4]`. Prompt S/R: the first value is "
                "the text to replace.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=420):
            axes = []
            for letter, kind, values in (("X", "Sampler", "euler, ddim"), ("Y", "Steps", "10, 20"),
                                         ("Z", "Nothing", "")):
                with gr.Row():
                    axes.append(gr.Dropdown(["Nothing", *AXES], value=kind, label=f"{letter} type",
                                            elem_id=f"xyz-{letter.lower()}-type"))
                    axes.append(gr.Textbox(value=values, label=f"{letter} values",
                                           elem_id=f"xyz-{letter.lower()}-values"))
            with gr.Row():
                run = gr.Button("Generate grid", variant="primary", elem_id="xyz-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="xyz-cancel")
        with gr.Column(scale=6, min_width=420):
            grid = gr.Image(label="Grid", type="filepath", interactive=False, height=420, elem_id="xyz-grid",
                            elem_classes=["result-gallery"])
            info = gr.Markdown(elem_id="xyz-info")
            cells = gr.Gallery(label="Images", columns=4, format="png", object_fit="contain", height=300,
                               elem_id="xyz-gallery", elem_classes=["result-gallery"])
            files = gr.File(label="Download the grid and the images (PNG, parameters embedded)",
                            file_count="multiple", elem_id="xyz-files")

    hires = txt_settings["extra_inputs"]  # the Text to image tab's hires fix applies to every cell

    def on_grid(request: gr.Request, progress=gr.Progress(), *values):
        names, settings_end = list(SETTING_NAMES), len(SETTING_NAMES) + len(hires)
        try:
            base = txt2img_request(dict(zip(names, values[: len(names)])), *values[len(names):settings_end])
            plot = XYZPlot.parse(axis_specs(values[settings_end:]))
        except ValueError as error:  # AxisError included
            raise gr.Error(str(error), title="Invalid request") from None
        return run_grid(service, base, plot, request.session_hash, progress)

    def on_cancel(request: gr.Request):  # the grid stops within one step and shows the cells already made
        service.stop_session(request.session_hash)

    run.click(on_grid, inputs=[txt_settings[n] for n in SETTING_NAMES] + hires + axes, outputs=[grid, info, cells, files],
              api_name="xyz", concurrency_id=GENERATION_QUEUE)
    cancel.click(on_cancel, inputs=None, outputs=None, api_name="xyz_cancel")


def axis_specs(fields) -> list[str]:
    """'TYPE: VALUES' for every axis whose type is not Nothing (type, values, type, values, ...)."""
    kinds = [kind if kind not in (None, "") else "Nothing" for kind in fields[::2]]
    used = [kind != "Nothing" for kind in kinds]
    if used != sorted(used, reverse=True):
        raise ValueError("Fill the axes in order: X first, then Y, then Z (an axis is set after one set to Nothing).")
    return [f"{kind}: {values}" for kind, values in zip(kinds, fields[1::2]) if kind != "Nothing"]


def run_grid(service: GenerationService, base: ServiceRequest, plot: XYZPlot, session: str, progress) -> tuple:
    """The plot run with progress (cell i of n) and Cancel; (grid, summary, gallery, downloads)."""
    if len(plot.cells()) > MAX_GRID_CELLS:
        raise gr.Error(f"This plot has {len(plot.cells())} cells; at most {MAX_GRID_CELLS}: use fewer values.",
                       title="Invalid request")
    stop = service.register_stop(session)

    def report(cell, cells, step, steps):
        progress((cell * steps + step, cells * steps), desc=f"cell {cell + 1} of {cells}", unit="steps")

    try:
        result = run_plot(service, base, plot, on_progress=report, stop=stop)
    except (AxisError, ValueError) as error:
        raise gr.Error(str(error), title="Invalid request") from None
    except Exception as error:  # shown to this user only; the server and other requests carry on
        raise gr.Error(f"Generation failed: {type(error).__name__}: {without_paths(str(error))}",
                       title="Generation failed") from None
    finally:
        service.release_stop(session, stop)
    served = [served_copy(path) for _, path, _ in result.cells]
    gallery = [(copy, plot.cell_name(cell)) for copy, (cell, _, _) in zip(served, result.cells)]
    if result.cancelled:
        gr.Warning(f"Cancelled: {len(result.cells)} of {len(plot.cells())} cells finished; no grid was made.")
        return None, f"Cancelled after {len(result.cells)} of {len(plot.cells())} cells.", gallery, served
    grid = served_copy(result.grid)
    axes = "; ".join(f"{letter}: {axis['type']} ({axis['values']})" for letter, axis in zip("XYZ", plot.describe()))
    summary = f"**X/Y/Z plot** of {len(result.cells)} images, grid `{result.grid.name}`. {axes}"
    return grid, summary, gallery, [grid, *served]


def png_tab(txt_settings: dict, tabs) -> None:
    upload = gr.File(label="PNG written by this toolkit or by AUTOMATIC1111", file_types=[".png"])
    text = gr.Textbox(label="Parameters", lines=6, interactive=False)
    fields = gr.State({})
    send = gr.Button("Send to text to image")
    upload.change(png_info, inputs=upload, outputs=[text, fields], api_name="png_info")
    send_to_txt2img(send, fields, txt_settings, tabs, api_name="png_info_send")


def send_to_txt2img(button, fields, txt_settings: dict, tabs, api_name) -> None:
    """`button` fills the txt2img form from the `fields` State (see `form_fields`) and opens that tab."""
    def on_send(found: dict):
        extra = [*hires_settings(found or {}), *refiner_settings(found or {})][: len(txt_settings["extra_inputs"])]
        return [*fields_to_settings(found or {}, names), *extra, gr.Tabs(selected="txt2img")]

    names = [*SETTING_NAMES, *(n for n in SDXL_SETTING_NAMES if n in txt_settings)]  # an SDXL model's fields too
    outputs = [txt_settings[n] for n in names] + txt_settings["extra_inputs"] + [tabs]
    button.click(on_send, inputs=fields, outputs=outputs, api_name=api_name)


def refiner_settings(fields: dict) -> list:
    """Updates for the Refiner accordion: on at the PNG's "Refiner switch at", else off."""
    switch_at = fields.get("refiner_switch_at")
    return [gr.update(value=True), gr.update(value=switch_at)] if switch_at else [gr.update(value=False), gr.update()]


def hires_settings(fields: dict) -> list:
    """Updates for the hires fix accordion (`hires_inputs` order): on with the PNG's values when its text or
    recipe has a hires pass, else off (as A1111 fills "Hires. fix" from the infotext)."""
    hires = fields.get("hires")
    if not hires:
        return [gr.update(value=False), *(gr.update() for _ in range(4))]
    hires = {**HiresFix().as_dict(), **hires}
    try:
        upscaler = gr.update(value=upscaler_name(hires["upscaler"]))
    except ValueError:  # an A1111 upscaler we do not have (R-ESRGAN, ...): the menu keeps its choice
        upscaler = gr.update()
    return [gr.update(value=True), *(gr.update(value=hires[k]) for k in ("scale", "steps", "strength")), upscaler]


def history_tab(page, history, txt_settings: dict, tabs) -> None:
    """This browser session's earlier results (newest first) with their parameters, shown when the tab opens;
    the selected one can be sent back to text to image. Only the session's own gr.State is read."""
    gallery = gr.Gallery(label="Earlier results of this session (newest first)", columns=6, height=420, format="png",
                         object_fit="contain", interactive=False, elem_id="history-gallery",
                         elem_classes=["history-gallery"])  # small thumbnails, whole and pixelated
    text = gr.Textbox(label="Parameters of the selected result", lines=4, interactive=False,
                      elem_id="history-parameters")
    fields = gr.State({})
    send = gr.Button("Send to text to image", elem_id="history-send")

    def on_show(entries: list):
        return [(entry["image"], entry["caption"]) for entry in entries or []]

    def on_select(entries: list, evt: gr.SelectData):
        if not entries or not isinstance(evt.index, int) or not 0 <= evt.index < len(entries):
            return "", {}
        entry = entries[evt.index]
        return entry["caption"], form_fields(metadata.parse_parameters(entry["caption"]), entry["recipe"])

    page.select(on_show, inputs=history, outputs=gallery, api_name="history")
    gallery.select(on_select, inputs=history, outputs=[text, fields], api_name="history_select")
    send_to_txt2img(send, fields, txt_settings, tabs, api_name="history_send")


ADAPTER_KINDS = {"lora": "LoRA", "embedding": "Embedding"}  # kind -> label (the folder flag is --KIND-dir)


def adapter_picker(service: GenerationService, prompt, prefix: str) -> None:
    """The LoRAs and embeddings of --lora-dir / --embedding-dir by name, each added to the prompt with its
    weight (`<lora:NAME:W>`, `(NAME:W)`) as A1111's extra networks do; shown when the folders offer any."""
    offered = {"lora": service.adapters.lora_names(), "embedding": service.adapters.embedding_names()}
    shown = {kind: choices for kind, choices in offered.items()
             if choices or (kind == "lora" and service.adapters.lora_dir is not None)}  # LoRAs may come later
    if not shown:
        return
    with gr.Accordion("LoRA and embeddings", open=True):
        for kind, choices in shown.items():
            with gr.Row(equal_height=False):
                name = gr.Dropdown(choices, value=choices[0] if choices else None, label=f"{ADAPTER_KINDS[kind]} (--{kind}-dir)",
                                   elem_id=f"{prefix}-{kind}-name", scale=3, min_width=140,
                                   allow_custom_value=kind == "lora")  # refreshed choices: add_to_prompt checks names
                weight = gr.Number(value=1.0, label=f"{ADAPTER_KINDS[kind]} weight", elem_id=f"{prefix}-{kind}-weight",
                                   scale=2, min_width=90)
                add = gr.Button(f"Add {ADAPTER_KINDS[kind]} to the prompt", elem_id=f"{prefix}-add-{kind}", size="sm",
                                scale=2, min_width=120)
            add.click(functools.partial(add_to_prompt, service, kind), inputs=[prompt, name, weight], outputs=prompt,
                      api_name=f"{prefix}_add_{kind}")
            if kind == "lora":  # the folder is read again: LoRAs copied in while the server runs (A1111's Refresh)
                refresh = gr.Button("Refresh the LoRA list", elem_id=f"{prefix}-refresh-lora", size="sm")
                refresh.click(functools.partial(refreshed_loras, service), inputs=name, outputs=name,
                              api_name=f"{prefix}_refresh_lora")


def refreshed_loras(service: GenerationService, current: str | None):
    """The LoRA menu with the names --lora-dir holds now (the current choice kept while it is still there)."""
    names = service.adapters.lora_names()
    return gr.update(choices=names, value=current if current in names else (names[0] if names else None))


def add_to_prompt(service: GenerationService, kind: str, prompt: str, name: str, weight: float) -> str:
    """`prompt` + the tag of LoRA / embedding `name` (a name offered by its folder, never a path)."""
    offered = service.adapters.lora_names() if kind == "lora" else service.adapters.embedding_names()
    if name not in offered:
        raise gr.Error(f"{ADAPTER_KINDS[kind]} {name!r} is not in --{kind}-dir; choose one of "
                       f"{', '.join(offered) or 'none'}.", title="Invalid request")
    if weight is None:
        raise gr.Error(f"{ADAPTER_KINDS[kind]} weight is empty: type a number (1 = full strength).",
                       title="Invalid request")
    tag = f"<lora:{name}:{weight:g}>" if kind == "lora" else name if weight == 1 else f"({name}:{weight:g})"
    return f"{prompt.rstrip()} {tag}" if prompt and prompt.strip() else tag


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
                        help="weights dtype (default fp32 on every device)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle checkpoints (.ckpt/.bin/.pt), and offering such LoRAs and "
                             "embeddings: only for files you trust")
    parser.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                        help="LoRAs offered by name in the form and in <lora:NAME:W> prompt tags (only this folder)")
    parser.add_argument("--embedding-dir", type=Path, default=None, metavar="DIR",
                        help="textual-inversion embeddings loaded at start-up; the file name is the prompt token")
    parser.add_argument("--refiner", type=Path, default=None, metavar="FOLDER",
                        help="an SDXL refiner (diffusers folder) for an SDXL --model: Text to image offers it, "
                             "taking over at 'Switch at'")
    parser.add_argument("--trace", action="store_true",
                        help="torch.jit.trace the UNet once per image shape (faster steps on CPU; a few s per new shape)")
    parser.add_argument("--backend", default="auto", choices=["auto", "pytorch", "onnx"],
                        help="networks in PyTorch or ONNX Runtime (exported once per model); auto (default): the "
                             "fastest measured, ONNX Runtime on the CPU if installed, else the traced UNet")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if (args.lora_dir or args.embedding_dir) and (args.backend == "onnx" or args.trace):
        parser.error("--lora-dir and --embedding-dir need --backend pytorch without --trace: LoRAs and embeddings "
                     "change the networks, and an exported or traced network is fixed")
    return args


def backend_options(args: argparse.Namespace) -> dict:
    """--backend auto: the fastest measured, or eager PyTorch when LoRAs / embeddings change the networks."""
    if args.backend != "auto":
        return {"backend": args.backend, "trace": args.trace}
    if args.lora_dir or args.embedding_dir:
        return {"backend": "pytorch"}
    if args.model and path_family(Path(args.model)) == "sdxl":
        return {"backend": "pytorch", "trace": args.trace}  # no ONNX export of SDXL
    return long_running_backend(args.device, args.dtype, args.trace)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        service = GenerationService.load(args.model, args.outputs.resolve(), device=args.device, dtype=args.dtype,
                                         allow_pickle=args.allow_pickle, lora_dir=args.lora_dir,
                                         embedding_dir=args.embedding_dir, refiner=args.refiner,
                                         **backend_options(args))
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    # show_error=False: only our gr.Error messages reach the client, never an exception text quoting a path
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=MAX_UPLOAD_SIZE)


if __name__ == "__main__":
    main()
