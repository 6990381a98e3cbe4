"""The ONNX Runtime backend: our pipeline with its networks run by onnxruntime.

    load_pipeline(model, backend="onnx")      # ldm-generate --backend onnx / python app.py --backend onnx

`model` is an ONNX folder written by `ldm-export-onnx` (`ldm_pipeline.onnx_export`), or any model
`load_pipeline` takes (folder, single file, None = the embedded model): that is exported once into
a cache folder (`$LDM_CACHE_DIR/onnx/<key>`, default `~/.cache/ldm-toolkit/onnx/<key>`, the key
from the model's hash) and loaded from there afterwards.

The pipeline, `OnnxTextToImagePipeline`, runs the same stages as `LatentTextToImagePipeline`
(`pipeline.LatentTextToImageStages`: schedulers, guidance, seeds, recipes) on a plain class instead
of diffusers' `DiffusionPipeline`, with thin adapters for `unet`, `vae` and `text_encoder` that have
the calls and attributes the stages use (`unet(x, t, encoder_hidden_states=c, return_dict=False)`,
`vae.decode/encode`, `text_encoder(ids)`, `.config`, `.dtype`, `.device`) and the folder's CLIP
tokenizer read by `tokenizers` (`clip_tokenizer`). So loading it imports neither diffusers' pipelines
and models nor transformers: a cold one-image command spends most of its time importing those
(`benchmarks/cold_start.py`). Tensors cross to onnxruntime as numpy arrays that share memory with
them. It runs float32 on the CPU; LoRA and other weight changes need a new export.

`one_shot_backend` picks the backend of `ldm-generate --backend auto` (its default), `long_running_backend`
the app's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput

from ldm_pipeline.clip_tokenizer import load_tokenizer
from ldm_pipeline.loading import DEFAULT_MODEL_DIR, ModelLoadError, model_hash
from ldm_pipeline.pipeline import LatentTextToImageStages

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the exported graphs change (2: attention as MultiHeadAttention): old cache entries are then ignored
EXPORT_RECORD = "onnx_export.json"
INSTALL_HINT = "pip install 'ldm-toolkit[onnx]'"
ORT_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def import_onnxruntime(module: str = "onnxruntime"):
    """onnxruntime (or `onnx`, which the export needs), else a ModelLoadError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelLoadError(
            f"The ONNX backend needs {module}, which is not installed: {INSTALL_HINT} (the `onnx` extra), "
            "or use the default PyTorch backend."
        ) from error


def is_onnx_folder(path: Path) -> bool:
    return (path / "unet" / "model.onnx").is_file()


def session_options(ort):
    """onnxruntime's defaults (ORT_ENABLE_ALL: fusions and the CPU's NCHWc conv layout; memory patterns; arena),
    measured best in benchmarks/backend_speed.py's notes, on the same thread budget as the PyTorch backend."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


def optimized_path(path: Path) -> Path:
    """Where `save_optimized` keeps a graph's optimized copy, named by the onnxruntime that wrote it."""
    return path.with_name(f"{path.stem}.onnxruntime-{import_onnxruntime().__version__}.onnx")


def save_optimized(path: Path) -> Path | None:
    """Optimize a graph once and keep the result beside it, so sessions open ~2x faster (0.22 -> 0.10 s of CPU for
    the embedded UNet: a cold start's share). Saved as ONNX at ORT_ENABLE_EXTENDED, whose fusions hold on any CPU;
    the NCHWc conv layout for this CPU is applied when a session opens (ORT format would skip it at load: 25%
    slower runs, measured). On failure (e.g. a graph over 2 GB) the reason is logged and sessions open the
    exported file as before."""
    ort = import_onnxruntime()
    options = session_options(ort)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized_path(path))
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception classes from C++
        optimized_path(path).unlink(missing_ok=True)
        logger.warning("No optimized copy of %s (sessions open the .onnx file, a little slower): %s", path, error)
        return None
    return optimized_path(path)


class OnnxGraph:
    """One .onnx file in an onnxruntime session (its optimized copy when this onnxruntime wrote one), called with
    torch tensors by input name; returns torch tensors."""

    def __init__(self, path: Path):
        ort = import_onnxruntime()
        self.source = optimized_path(path) if optimized_path(path).is_file() else path
        self.session = ort.InferenceSession(str(self.source), session_options(ort), providers=["CPUExecutionProvider"])
        self.input_types = {i.name: ORT_TYPES[i.type] for i in self.session.get_inputs()}

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=self.input_types[name])
                 for name, tensor in inputs.items()}
        return [torch.from_numpy(out) for out in self.session.run(None, feeds)]


class OnnxComponent:
    """What every adapter shares: its diffusers/transformers config and where its outputs live."""

    backend = "onnx"
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, folder: Path, config):
        self.folder = folder
        self.config = config


def read_config(folder: Path) -> FrozenDict:
    return FrozenDict(json.loads((folder / "config.json").read_text()))


class OnnxUNet(OnnxComponent):
    def __init__(self, folder: Path):
        super().__init__(folder, read_config(folder))
        self.graph = OnnxGraph(folder / "model.onnx")

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict: bool = True):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)  # the graph broadcasts one t to the batch
        (out,) = self.graph(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states)
        if not return_dict:  # the pipeline's call: diffusers' models (a cold start's largest import) stay unloaded
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


class OnnxAutoencoder(OnnxComponent):
    """vae.decode / vae.encode; the encoder session opens on first use (img2img, inpainting)."""

    def __init__(self, folder: Path):
        super().__init__(folder, read_config(folder / "vae_decoder"))
        self.decoder = OnnxGraph(folder / "vae_decoder" / "model.onnx")

    @cached_property
    def encoder(self) -> OnnxGraph:
        return OnnxGraph(self.folder / "vae_encoder" / "model.onnx")

    def decode(self, z, return_dict: bool = True):
        (image,) = self.decoder(latent_sample=z)
        if not return_dict:
            return (image,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=image)

    def encode(self, x, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        _, parameters = self.encoder(sample=x)
        posterior = DiagonalGaussianDistribution(parameters)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


@dataclass
class TextEncoderOutput(BaseOutput):
    """What the pipeline reads of transformers' `BaseModelOutputWithPooling` (`[0]`, `.hidden_states`)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple | None = None


class OnnxTextEncoder(OnnxComponent):
    """text_encoder(ids) like CLIPTextModel's; `final_layer_norm` (for clip_skip) opens on first use.
    `.config` is the exported config.json (transformers writes every field), read without transformers."""

    def __init__(self, folder: Path):
        super().__init__(folder, read_config(folder))
        self.graph = OnnxGraph(folder / "model.onnx")

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
        if attention_mask is not None:
            raise ValueError("The exported text encoder takes no attention mask (use_attention_mask is off).")
        last, pooled, hidden = self.graph(input_ids=input_ids)
        return TextEncoderOutput(last_hidden_state=last, pooler_output=pooled,
                                 hidden_states=tuple(hidden.unbind(0)) if output_hidden_states else None)

    @cached_property
    def final_layer_norm(self):
        graph = OnnxGraph(self.folder / "final_layer_norm.onnx")
        return lambda hidden_states: graph(hidden_states=hidden_states)[0]


class OnnxTextToImagePipeline(LatentTextToImageStages):
    """The generation stages with the networks in onnxruntime, on a plain class (see module docstring).

    An exported model is fixed: no LoRA or textual-inversion loading, no device moves or offloading."""

    family = "sd"
    _execution_device = torch.device("cpu")

    def __init__(self, vae: OnnxAutoencoder, text_encoder: OnnxTextEncoder, tokenizer, unet: OnnxUNet, scheduler):
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.scheduler = scheduler
        self._init_state()

    @staticmethod
    def maybe_convert_prompt(prompt, tokenizer):
        """The prompt as it is: an export has no multi-vector textual-inversion tokens to expand."""
        return prompt

    def active_lora_records(self) -> list[dict]:
        """None: LoRAs are baked in before an export, if at all (recipes list the ones loaded at run time)."""
        return []

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising bar, as diffusers' pipelines take them."""
        self._progress_bar_config = kwargs


# ---------------------------------------------------------------- folders and the cache


def component_class(folder: Path, name: str) -> tuple[str, str]:
    """(library, class name) that model_index.json names for a component (as diffusers' from_pretrained reads it)."""
    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    return library, class_name


def check_onnx_folder(folder: Path) -> None:
    needed = ["model_index.json", "unet/model.onnx", "unet/config.json", "vae_decoder/model.onnx",
              "vae_decoder/config.json", "vae_encoder/model.onnx", "text_encoder/model.onnx",
              "text_encoder/final_layer_norm.onnx", "text_encoder/config.json", "tokenizer", "scheduler"]
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise ModelLoadError(f"{folder}: not a complete ONNX export (missing {', '.join(missing)}); write one with "
                             "`ldm-export-onnx MODEL OUT`.")


def load_onnx_folder(folder: Path) -> OnnxTextToImagePipeline:
    """The pipeline of an ONNX export folder, its networks in onnxruntime."""
    import_onnxruntime()
    check_onnx_folder(folder)
    try:
        library, scheduler_class = component_class(folder, "scheduler")
        pipe = OnnxTextToImagePipeline(
            vae=OnnxAutoencoder(folder), text_encoder=OnnxTextEncoder(folder / "text_encoder"),
            tokenizer=load_tokenizer(folder / "tokenizer", *component_class(folder, "tokenizer")),
            unet=OnnxUNet(folder / "unet"),
            scheduler=getattr(importlib.import_module(library), scheduler_class).from_pretrained(folder / "scheduler"),
        )
    except Exception as error:
        raise ModelLoadError(f"{folder}: could not load the ONNX export: {type(error).__name__}: {error}") from error
    record = folder / EXPORT_RECORD
    source = json.loads(record.read_text()).get("source", {}) if record.is_file() else {}
    pipe.model_id, pipe.model_hash = str(folder), source.get("hash") or model_hash(folder)
    return pipe


def cache_root() -> Path:
    if os.environ.get("LDM_CACHE_DIR"):
        return Path(os.environ["LDM_CACHE_DIR"]).expanduser() / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ldm-toolkit" / "onnx"


def cache_folder(source: Path) -> Path:
    """Where the export of a PyTorch model lives in the cache (keyed by the model's hash and FORMAT_VERSION)."""
    key = hashlib.sha256(f"{model_hash(source)}:{FORMAT_VERSION}".encode()).hexdigest()[:20]
    return cache_root() / key


def cached_export(source: Path, allow_pickle: bool, config) -> Path:
    """The ONNX export of a PyTorch model, made on first use (a few seconds for the embedded model)."""
    from ldm_pipeline.onnx_export import ExportError, export_onnx

    folder = cache_folder(source)
    if not (folder / EXPORT_RECORD).is_file():
        logger.warning("Exporting %s to ONNX in %s (once per model).", source, folder)
        try:  # written under a temporary name and renamed into place (`export_pipeline`)
            export_onnx(source, folder, allow_pickle=allow_pickle, config=config)
        except (ExportError, OSError):
            if not (folder / EXPORT_RECORD).is_file():  # not just another process finishing first
                raise
    return folder


def long_running_backend(device=None, dtype=None, trace: bool = False) -> dict:
    """Load options for a long-running process (the app's `--backend auto`), fastest first as measured warm by
    `benchmarks/backend_speed.py`: ONNX Runtime on the CPU when installed, else the traced UNet on the CPU,
    else eager PyTorch (an accelerator, or a dtype other than float32). `trace=True` asks for the traced UNet."""
    from ldm_pipeline.acceleration import resolve_dtype, select_device

    if trace:
        return {"backend": "pytorch", "trace": True}
    if select_device(device).type != "cpu" or resolve_dtype(dtype) != torch.float32:
        return {"backend": "pytorch"}
    if all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx")):
        return {"backend": "onnx"}
    return {"backend": "pytorch", "trace": True}


def one_shot_backend(model, *, device=None, dtype=None, pytorch_only: bool = False) -> str:
    """The backend for a one-shot command (`ldm-generate --backend auto`, its default): "onnx" when onnxruntime
    and onnx are installed, the run is on the CPU in float32, no PyTorch-only option is asked for, and the model
    is an ONNX export, the embedded model (exported into the cache on first use, a few seconds) or a model
    already in the cache; else "pytorch". Cold, one image, the ONNX path is the faster one because it imports
    neither diffusers' models nor transformers (`benchmarks/cold_start.py`); exporting a large model on first use
    would not pay off, so other models take the ONNX path only once exported (`--backend onnx`)."""
    from ldm_pipeline.acceleration import resolve_dtype, select_device
    from ldm_pipeline.loading import resolve_model_path

    if pytorch_only or select_device(device).type != "cpu" or resolve_dtype(dtype) != torch.float32:
        return "pytorch"
    if not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx")):
        return "pytorch"
    path = resolve_model_path(model)
    if is_onnx_folder(path) or path == DEFAULT_MODEL_DIR or (cache_folder(path) / EXPORT_RECORD).is_file():
        return "onnx"
    return "pytorch"


def load_onnx_pipeline(path: Path, *, device, dtype, allow_pickle: bool, config, accelerations):
    """`load_pipeline(..., backend="onnx")`: an ONNX folder as it is, anything else through the export cache."""
    if device is not None and torch.device(device).type != "cpu":
        raise ModelLoadError(f"The ONNX backend runs on the CPU; got device={device!r} (use the PyTorch backend).")
    if dtype not in (None, "fp32", "float32", torch.float32):
        raise ModelLoadError(f"The ONNX backend runs float32; got dtype={dtype!r}.")
    switches = [name for name, on in vars(accelerations).items() if on]
    if switches:
        raise ModelLoadError(f"{', '.join(switches)} apply to the PyTorch backend only; drop them for backend='onnx'.")
    import_onnxruntime()
    if is_onnx_folder(path):
        return load_onnx_folder(path)
    pipe = load_onnx_folder(cached_export(path, allow_pickle, config))
    pipe.model_id, pipe.model_hash = str(path), model_hash(path)
    return pipe
