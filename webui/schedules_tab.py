"""The Schedules tab: noise schedules on a common axis and the sampler accuracy table."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ldm_pipeline.plots import schedule_figures

REPO_DIR = Path(__file__).resolve().parent.parent  # the checkout (docs/ beside app.py)
ACCURACY_TABLE = REPO_DIR / "docs" / "sampler_accuracy.md"


def accuracy_table_markdown(path: Path = ACCURACY_TABLE) -> str:
    """The sampler accuracy table written by `benchmarks/sampler_accuracy.py`, or a note saying how to make it."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return (
        f"_No sampler accuracy table yet: `{path.relative_to(REPO_DIR)}` is missing. "
        "Run `python benchmarks/sampler_accuracy.py` to write it._"
    )


def schedules_tab() -> None:
    gr.Markdown("Noise schedules on a common axis (rectified flow via the VP schedule with the same SNR).")
    with gr.Row():
        for i, (title, figure) in enumerate(schedule_figures().items()):
            gr.Plot(figure, label=title, elem_id=f"schedule-plot-{i}")
    plot = ACCURACY_TABLE.with_suffix(".png")
    if plot.is_file():
        gr.Image(str(plot), label="Sampler accuracy", interactive=False, show_label=True)
    gr.Markdown(accuracy_table_markdown())
