"""The X/Y/Z plot tab: up to three axes over the Text to image settings (`ldm_pipeline.xyz`), one labelled grid."""

from __future__ import annotations

import gradio as gr

from ldm_pipeline.service import GenerationService, ServiceRequest
from ldm_pipeline.web_inputs import without_paths
from ldm_pipeline.xyz import AXES, AxisError, XYZPlot, run_plot
from webui.form import GENERATION_QUEUE, MAX_GRID_CELLS, SETTING_NAMES
from webui.generation import served_copy, txt2img_request


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
