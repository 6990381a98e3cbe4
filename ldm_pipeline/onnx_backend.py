"""The ONNX Runtime backend: our pipeline with its networks run by onnxruntime.

    load_pipeline(model, backend="onnx")      # ldm-generate --backend onnx / python app.py --backend onnx

`model` is an ONNX folder written by `ldm-export-onnx` (`ldm_pipeline.onnx_export`), or any model
`load_pipeline` takes (folder, single file, None = the embedded model): that is exported once into
a cache folder (`$LDM_CACHE_DIR/onnx/<key>`, default `~/.cache/ldm-toolkit/onnx/<key>`, the key
from the model's hash) and loaded from there afterwards.

The pipeline is the same `LatentTextToImagePipeline` (schedulers, guidance, seeds, recipes); only
`unet`, `vae` and `text_encoder` are replaced by thin adapters with the calls and attributes the
pipeline uses (`unet(x, t, encoder_hidden_states=c, return_dict=False)`, `vae.decode/encode`,
`text_encoder(ids)`, `.config`, `.dtype`, `.device`). Tensors cross to onnxruntime as numpy
arrays that share memory with them. It runs float32 on the CPU; LoRA and other weight changes
need a new export.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from ldm_pipeline.loading import ModelLoadError, model_hash

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the exported graphs' inputs or outputs change: old cache entries are then ignored
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


class OnnxGraph:
    """One .onnx file in an onnxruntime session, called with torch tensors by input name; returns torch tensors."""

    def __init__(self, path: Path):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as the PyTorch backend
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)  # the graph broadcasts one t to the batch
        (out,) = self.graph(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class OnnxAutoencoder(OnnxComponent):
    """vae.decode / vae.encode; the encoder session opens on first use (img2img, inpainting)."""

    def __init__(self, folder: Path):
        super().__init__(folder, read_config(folder / "vae_decoder"))
        self.decoder = OnnxGraph(folder / "vae_decoder" / "model.onnx")

    @cached_property
    def encoder(self) -> OnnxGraph:
        return OnnxGraph(self.folder / "vae_encoder" / "model.onnx")

    def decode(self, z, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        (image,) = self.decoder(latent_sample=z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        _, parameters = self.encoder(sample=x)
        posterior = DiagonalGaussianDistribution(parameters)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


class OnnxTextEncoder(OnnxComponent):
    """text_encoder(ids) like CLIPTextModel's; `final_layer_norm` (for clip_skip) opens on first use."""

    def __init__(self, folder: Path):
        from transformers import CLIPTextConfig

        super().__init__(folder, CLIPTextConfig.from_pretrained(folder))
        self.graph = OnnxGraph(folder / "model.onnx")

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if attention_mask is not None:
            raise ValueError("The exported text encoder takes no attention mask (use_attention_mask is off).")
        last, pooled, hidden = self.graph(input_ids=input_ids)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                          hidden_states=tuple(hidden.unbind(0)) if output_hidden_states else None)

    @cached_property
    def final_layer_norm(self):
        graph = OnnxGraph(self.folder / "final_layer_norm.onnx")
        return lambda hidden_states: graph(hidden_states=hidden_states)[0]


# ---------------------------------------------------------------- folders and the cache


def component_class(folder: Path, name: str):
    """The class model_index.json names for a component (as diffusers' from_pretrained resolves it)."""
    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    return getattr(importlib.import_module(library), class_name)


def check_onnx_folder(folder: Path) -> None:
    needed = ["model_index.json", "unet/model.onnx", "unet/config.json", "vae_decoder/model.onnx",
              "vae_decoder/config.json", "vae_encoder/model.onnx", "text_encoder/model.onnx",
              "text_encoder/final_layer_norm.onnx", "text_encoder/config.json", "tokenizer", "scheduler"]
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise ModelLoadError(f"{folder}: not a complete ONNX export (missing {', '.join(missing)}); write one with "
                             "`ldm-export-onnx MODEL OUT`.")


def load_onnx_folder(folder: Path):
    """A `LatentTextToImagePipeline` whose networks run in onnxruntime."""
    from ldm_pipeline.pipeline import LatentTextToImagePipeline

    import_onnxruntime()
    check_onnx_folder(folder)
    try:
        pipe = LatentTextToImagePipeline(
            vae=OnnxAutoencoder(folder), text_encoder=OnnxTextEncoder(folder / "text_encoder"),
            tokenizer=component_class(folder, "tokenizer").from_pretrained(folder / "tokenizer"),
            unet=OnnxUNet(folder / "unet"),
            scheduler=component_class(folder, "scheduler").from_pretrained(folder / "scheduler"),
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


def cached_export(source: Path, allow_pickle: bool, config) -> Path:
    """The ONNX export of a PyTorch model, made on first use (a few seconds for the embedded model)."""
    from ldm_pipeline.onnx_export import ExportError, export_onnx

    key = hashlib.sha256(f"{model_hash(source)}:{FORMAT_VERSION}".encode()).hexdigest()[:20]
    folder = cache_root() / key
    if not (folder / EXPORT_RECORD).is_file():
        logger.warning("Exporting %s to ONNX in %s (once per model).", source, folder)
        try:
            export_onnx(source, folder, allow_pickle=allow_pickle, config=config)
        except ExportError:
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
