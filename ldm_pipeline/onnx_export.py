"""Export a model's networks to ONNX: `ldm-export-onnx MODEL OUT` or `export_onnx(model, out)`.

The folder written has diffusers' ONNX layout, so it loads on its own (our
`load_pipeline(OUT, backend="onnx")`, and stock diffusers' `OnnxStableDiffusionPipeline`)::

    model_index.json   onnx_export.json (source model, hash, opset, versions, checks)   record.json
    unet/model.onnx + config.json          vae_decoder/model.onnx + config.json
    vae_encoder/model.onnx + config.json   text_encoder/model.onnx + final_layer_norm.onnx + config.json
    tokenizer/   scheduler/
    beside each model.onnx: model.onnxruntime-<version>.onnx, its optimized copy (`onnx_backend.save_optimized`)

Every graph has dynamic batch and spatial (or sequence) axes. The UNet is traced at a latent
size that is not a multiple of its total down-sampling factor, so diffusers' UNet takes its
`upsample_size` branch and the graph resizes to the skip connections' sizes: one graph serves
every size the PyTorch UNet accepts. Each graph is then run by onnxruntime on seeded random inputs
at two shapes (batch 1 at the native size, batch 3 at another size) and compared with PyTorch:
max |onnx - torch| <= ATOL + RTOL * max |torch|, else the export fails. Attention is written as
onnxruntime's `MultiHeadAttention` node (`onnx_attention`), so the graphs need onnxruntime to run.

Exported with `torch.onnx.export(dynamo=False)` (the TorchScript exporter: no onnxscript needed,
and it keeps the traced shape arithmetic dynamic). optimum's exporters are not used: they are not
installable offline here and target hub model types rather than our components.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ldm_pipeline.loading import ModelLoadError, check_onnx_family, load_components, resolve_model_path
from ldm_pipeline.onnx_attention import multi_head_attention_export
from ldm_pipeline.onnx_backend import EXPORT_RECORD, FORMAT_VERSION, import_onnxruntime, save_optimized

OPSET = 17  # LayerNormalization is a single op from 17 on
ATOL, RTOL = 1e-4, 1e-4  # measured: ~1e-6 relative on the embedded model and the tiny test models


class ExportError(RuntimeError):
    """An export failed or did not reproduce PyTorch; the message says which graph and by how much."""


# ---------------------------------------------------------------- plain-tensor graphs


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """Outputs the posterior mean (first: what stock ONNX pipelines read) and its parameters (mean, logvar)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        posterior = self.vae.encode(sample, return_dict=False)[0]
        return posterior.mean, posterior.parameters


class TextEncoderGraph(torch.nn.Module):
    """last_hidden_state, pooler_output and every layer's hidden states stacked [layers + 1, B, S, D] (clip_skip)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.last_hidden_state, out.pooler_output, torch.stack(out.hidden_states)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


# ---------------------------------------------------------------- what is exported


@dataclass
class Graph:
    """One ONNX file: the module, example inputs by name (trace shapes), outputs, dynamic axes, check inputs."""

    path: str  # relative to the export folder
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    checks: list[dict[str, torch.Tensor]] = field(default_factory=list)


def unet_trace_size(unet) -> int:
    """A latent side that is not a multiple of the UNet's down-sampling factor (see module docstring)."""
    upsamplers = len(unet.config.block_out_channels) - 1
    return 3 * 2 ** (upsamplers - 1) if upsamplers else unet.config.sample_size


def unet_graph(unet, sequence: int, g: torch.Generator) -> Graph:
    channels, native, dim = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
    trace = unet_trace_size(unet)

    def inputs(batch, height, width, windows):
        return {"sample": torch.randn(batch, channels, height, width, generator=g),
                "timestep": torch.rand(batch, generator=g) * 999,
                "encoder_hidden_states": torch.randn(batch, sequence * windows, dim, generator=g)}

    return Graph(
        "unet/model.onnx", UNetGraph(unet), inputs(2, trace, trace, 1), ("out_sample",),
        {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "timestep_batch"},
         "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": {0: "batch", 2: "height", 3: "width"}},
        [inputs(1, native, native, 1), inputs(3, trace, native + trace, 2)],
    )


def vae_graphs(vae, latent_size: int, g: torch.Generator) -> list[Graph]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    spatial = {0: "batch", 2: "height", 3: "width"}

    def latents(batch, h, w):
        return {"latent_sample": torch.randn(batch, vae.config.latent_channels, h, w, generator=g)}

    def pixels(batch, h, w):
        return {"sample": torch.rand(batch, vae.config.in_channels, h * factor, w * factor, generator=g) * 2 - 1}

    shapes = [(1, latent_size, latent_size), (3, latent_size // 2 + 1, latent_size + 2)]
    decoder = Graph("vae_decoder/model.onnx", VaeDecoderGraph(vae), latents(2, latent_size, latent_size), ("sample",),
                    {"latent_sample": spatial, "sample": spatial}, [latents(*s) for s in shapes])
    encoder = Graph("vae_encoder/model.onnx", VaeEncoderGraph(vae), pixels(2, latent_size, latent_size),
                    ("latent_sample", "latent_parameters"),
                    {"sample": spatial, "latent_sample": spatial, "latent_parameters": spatial},
                    [pixels(*s) for s in shapes])
    return [decoder, encoder]


def text_graphs(text_encoder, sequence: int, g: torch.Generator) -> list[Graph]:
    if getattr(text_encoder.config, "use_attention_mask", False):
        raise ExportError("The text encoder uses an attention mask (use_attention_mask=True); the ONNX export "
                          "supports CLIP text encoders without one (every Stable Diffusion 1.x/2.x model).")
    vocab, dim = text_encoder.config.vocab_size, text_encoder.config.hidden_size

    def ids(batch):
        return {"input_ids": torch.randint(0, vocab, (batch, sequence), generator=g, dtype=torch.int32)}

    def hidden(batch):
        return {"hidden_states": torch.randn(batch, sequence, dim, generator=g) * 3}

    encoder = Graph(
        "text_encoder/model.onnx", TextEncoderGraph(text_encoder), ids(2),
        ("last_hidden_state", "pooler_output", "hidden_states"),
        {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
         "pooler_output": {0: "batch"}, "hidden_states": {1: "batch", 2: "sequence"}},
        [ids(1), ids(3)],
    )
    norm = Graph("text_encoder/final_layer_norm.onnx", final_layer_norm(text_encoder), hidden(2), ("normed",),
                 {"hidden_states": {0: "batch", 1: "sequence"}, "normed": {0: "batch", 1: "sequence"}},
                 [hidden(1), hidden(3)])
    return [encoder, norm]


def graphs_of(pipe, seed: int = 0) -> list[Graph]:
    g = torch.Generator().manual_seed(seed)
    sequence = pipe.tokenizer.model_max_length
    return [unet_graph(pipe.unet, sequence, g), *vae_graphs(pipe.vae, pipe.unet.config.sample_size, g),
            *text_graphs(pipe.text_encoder, sequence, g)]


# ---------------------------------------------------------------- export and check


def export_graph(graph: Graph, folder: Path, opset: int = OPSET) -> Path:
    path = folder / graph.path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), multi_head_attention_export():
        # the tracer warns about diffusers' Python-side shape checks; the checks below verify the result
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.module.eval(), tuple(graph.inputs.values()), str(path), dynamo=False, opset_version=opset,
            input_names=list(graph.inputs), output_names=list(graph.outputs), dynamic_axes=graph.dynamic_axes,
        )
    return path


@dataclass
class GraphCheck:
    """onnxruntime vs PyTorch on one graph: the worst error over the check shapes."""

    graph: str
    shapes: list[list[int]]  # the first input's shape of every check
    max_abs_error: float
    max_abs_reference: float

    @property
    def tolerance(self) -> float:
        return ATOL + RTOL * self.max_abs_reference

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance


def check_graph(graph: Graph, path: Path) -> GraphCheck:
    from ldm_pipeline.onnx_backend import OnnxGraph

    session = OnnxGraph(path)
    error = reference = 0.0
    for inputs in graph.checks:
        with torch.no_grad():
            expected = graph.module(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        for got, want in zip(session(**inputs), expected):
            error = max(error, (got - want).abs().max().item())
            reference = max(reference, want.abs().max().item())
    return GraphCheck(graph.path, [list(next(iter(c.values())).shape) for c in graph.checks], error, reference)


def write_configs(pipe, folder: Path) -> None:
    """Configs, tokenizer and scheduler beside the graphs, and diffusers' ONNX model_index.json."""
    pipe.unet.save_config(folder / "unet")
    for part in ("vae_decoder", "vae_encoder"):
        pipe.vae.save_config(folder / part)
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    index = {
        "_class_name": "OnnxStableDiffusionPipeline", "requires_safety_checker": False,
        "vae_encoder": onnx_model, "vae_decoder": onnx_model, "text_encoder": onnx_model, "unet": onnx_model,
        "tokenizer": list(_fetch_class_library_tuple(pipe.tokenizer)),
        "scheduler": list(_fetch_class_library_tuple(pipe.scheduler)),
        "safety_checker": [None, None], "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_record(pipe, source: Path, opset: int, checks: list[GraphCheck]) -> dict:
    from ldm_pipeline.metadata import library_versions

    return {
        "format": FORMAT_VERSION, "source": {"id": str(source), "hash": pipe.model_hash}, "opset": opset,
        "versions": {**library_versions(), "onnxruntime": import_onnxruntime().__version__},
        "checks": [{**asdict(c), "tolerance": c.tolerance} for c in checks],
    }


def export_pipeline(pipe, source: Path, out: Path, opset: int = OPSET) -> list[GraphCheck]:
    """Write the ONNX folder for a loaded (eager, float32, CPU) pipeline into `out` (which must not exist)."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new folder or delete it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        checks = []
        for graph in graphs_of(pipe):
            path = export_graph(graph, work, opset)
            save_optimized(path)
            checks.append(check_graph(graph, path))  # the session the backend opens: the optimized copy
        bad = [c for c in checks if not c.ok]
        if bad:
            raise ExportError("onnxruntime does not reproduce PyTorch: " + "; ".join(
                f"{c.graph}: max error {c.max_abs_error:.3g} > {c.tolerance:.3g}" for c in bad))
        write_configs(pipe, work)
        record = source / "record.json"
        if record.is_file():
            shutil.copy(record, work / "record.json")
        (work / EXPORT_RECORD).write_text(json.dumps(export_record(pipe, source, opset, checks), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return checks


def export_onnx(model=None, out=None, *, allow_pickle: bool = False, config=None, opset: int = OPSET
                ) -> list[GraphCheck]:
    """Export `model` (a folder, a single file with `config`, or None = the embedded model) to the folder `out`."""
    import_onnxruntime()
    import_onnxruntime("onnx")  # torch.onnx.export writes the file with it
    if out is None:
        raise ValueError("export_onnx needs `out`, the folder to write.")
    source = resolve_model_path(model)
    check_onnx_family(source, config)
    pipe = load_components(source, torch.float32, allow_pickle, config)
    return export_pipeline(pipe, source, Path(out), opset)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-export-onnx", description="Export a model's UNet, VAE and text encoder to ONNX, check them "
        "against PyTorch, and write a folder that `ldm-generate --backend onnx --model OUT` loads.")
    p.add_argument("model", metavar="MODEL", help="diffusers folder or .safetensors file; `default` = the embedded "
                   "model")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist or be empty)")
    p.add_argument("--config", default=None, metavar="DIR", help="config folder for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt weights (can run code)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = None if args.model == "default" else args.model
    try:
        checks = export_onnx(model, args.out, allow_pickle=args.allow_pickle, config=args.config, opset=args.opset)
    except (ModelLoadError, ExportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| graph | check shapes | max abs error | tolerance |\n|---|---|---|---|")
    for c in checks:
        print(f"| {c.graph} | {' '.join('x'.join(map(str, s)) for s in c.shapes)} | {c.max_abs_error:.2e} | "
              f"{c.tolerance:.2e} |")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
