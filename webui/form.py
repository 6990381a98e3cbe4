"""The generation form every tab shares: its limits, its settings (in the order callbacks receive them), the
controls that show them, and the `ServiceRequest` they make."""

from __future__ import annotations

import gradio as gr

from custom_schedulers import names
from ldm_pipeline import GenerationOptions
from ldm_pipeline.guidance import SCHEDULE_NAMES
from ldm_pipeline.guidance_methods import METHODS, PARAMETERS, GuidanceMethod
from ldm_pipeline.options import MAX_SIDE
from ldm_pipeline.previews import PREVIEW_MODES
from ldm_pipeline.service import ServiceRequest

# the form's own limits (every generation setting is checked by GenerationOptions.check, as the CLI's and the API's)
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
    numbers = {k: whole_setting(k, v.pop(k)) for k in ("steps", "width", "height", "seed", "batch_count", "batch_size")}
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
    n = {k: whole_setting(k, fields[k]) for k in SDXL_SETTING_NAMES[2:]}
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


def whole_setting(name: str, value) -> int | float:
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
    options.update({key: whole_setting(key, form[key]) if key == "cfg_zero_init_steps" else form[key]
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


def preview_steps(value) -> int | None:
    """The form's 'preview every N steps' (0 or empty = off)."""
    if value in (None, "") or float(value) <= 0:
        return None
    if not float(value).is_integer():
        raise gr.Error(f"Preview every N steps must be a whole number, got {value}.", title="Invalid request")
    return int(value)
