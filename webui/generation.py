"""The Text to image, Image to image and Inpainting tabs: settings on the left, results on the right; a
request runs in a worker thread with previews, progress and Cancel, and its results join the session's history."""

from __future__ import annotations

import concurrent.futures
import contextvars
import queue
from dataclasses import replace
from pathlib import Path

import gradio as gr
from PIL import Image, ImageChops

from ldm_pipeline import metadata
from ldm_pipeline.hires import UPSCALERS, HiresFix
from ldm_pipeline.service import GenerationService, ServiceRequest
from ldm_pipeline.web_inputs import without_paths
from webui.adapter_picker import adapter_picker
from webui.form import (
    GENERATION_QUEUE,
    MAX_HISTORY,
    SDXL_SETTING_NAMES,
    SETTING_NAMES,
    action_buttons,
    preview_steps,
    prompt_controls,
    request_from_form,
    result_controls,
    settings_controls,
    whole_setting,
)


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
    hires = HiresFix(scale=scale, steps=whole_setting("hires_steps", steps), strength=strength, upscaler=upscaler)
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


def img2img_inputs() -> list:
    init = gr.Image(type="pil", label="Init image", image_mode=None)  # options.as_rgb converts any mode
    return [init, gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (1 = ignore the image)")]


def inpaint_inputs() -> list:
    editor = gr.ImageEditor(type="pil", label="Image: paint over the part to repaint",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
    return [editor, gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength")]
