"""Gradio web UI for the ldm toolkit: the command line, the page's tabs put together, and the server.

Every image is made by `ldm_pipeline` (the same code path as the `ldm-generate` batch CLI); the tabs
(`webui/`: the shared form, the generation tabs, X/Y/Z, PNG info and History, the adapter pickers,
Schedules) only turn form fields into service requests and results into gallery entries.

    python app.py                       # embedded default model on http://127.0.0.1:7860
    python app.py --model PATH          # any SD folder or single .safetensors file
    python app.py --host 0.0.0.0 --port 8000 --share   # only when you mean it
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import gradio as gr

from ldm_pipeline import ModelLoadError
from ldm_pipeline.loading import DEFAULT_MODEL_DIR, path_family
from ldm_pipeline.onnx_backend import long_running_backend
from ldm_pipeline.service import GenerationService
from ldm_pipeline.web_inputs import protect_inputs
from webui.form import MAX_UPLOAD_PIXELS, MAX_UPLOAD_SIZE
from webui.generation import (
    generation_tab,
    img2img_inputs,
    img2img_request,
    inpaint_inputs,
    inpaint_request,
    txt2img_inputs,
    txt2img_request,
)
from webui.parameters import history_tab, png_tab
from webui.schedules_tab import schedules_tab
from webui.xyz_tab import xyz_tab

# ---------------------------------------------------------------- the page


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
