"""Parameters sent back to the form: the PNG info tab (ours or A1111's PNGs) and the session's History tab
fill the Text to image settings, hires fix and refiner included."""

from __future__ import annotations

import gradio as gr

from custom_schedulers import names
from ldm_pipeline import metadata
from ldm_pipeline.hires import HiresFix, upscaler_name
from webui.form import METHOD_FIELDS, SDXL_SETTING_NAMES, SETTING_NAMES


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
