"""Loading a model into `LatentTextToImagePipeline`.

    load_pipeline(model=None, *, device=None, dtype=None, allow_pickle=False, **kw)

`model` is one of

* None: the embedded default model in `ldm_pipeline/default_model/`;
* a diffusers folder (model_index.json + vae/, text_encoder/, tokenizer/, unet/,
  scheduler/), e.g. any Stable Diffusion 1.x/2.x folder or one written by `training/`;
  an SDXL folder (also text_encoder_2/, tokenizer_2/) loads into `sdxl.LatentSDXLPipeline`
  (a refiner, whose index has no text_encoder/tokenizer, too);
  the family found ("sd" or "sdxl") is logged and kept as `pipe.family`. SD3 and Flux
  (transformer/ models) are refused, pointing to the stock pipelines;
* a single `.safetensors` checkpoint in the original LDM layout, loaded with diffusers'
  `from_single_file` fully offline; such a file carries no configs and no tokenizer,
  so `config=` must name a diffusers folder of the same architecture (its weights are
  not needed, only its config files and tokenizer); an SDXL config folder reads an SDXL
  checkpoint (`conditioner.embedders.*` text encoders).

Pickle formats (.ckpt, .bin, .pt, .pth) can run code when loaded: they are refused
unless `allow_pickle=True`.

Keyword options (`kw`): `config` (see above), `scheduler` (a name for `swap_scheduler`)
and the switches of `acceleration.Accelerations` (xformers, attention_slicing,
vae_slicing, vae_tiling, cpu_offload, compile, trace).

`backend`: "pytorch" (default) or "onnx": the same pipeline with its networks run by
onnxruntime, from an `ldm-export-onnx` folder or exported on first use (`onnx_backend`).

Every failure raises `ModelLoadError` naming the path and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ldm_pipeline.acceleration import Accelerations, apply_accelerations, resolve_dtype, select_device

if TYPE_CHECKING:
    from ldm_pipeline.diffusers_pipeline import LatentTextToImagePipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")  # torch/pickle formats: run code on load
COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHT_COMPONENTS = ("vae", "text_encoder", "unet")
BACKENDS = ("pytorch", "onnx")
FAMILY_EXTRA_COMPONENTS = {"sd": (), "sdxl": ("text_encoder_2", "tokenizer_2")}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the path and the problem."""


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    backend: str = "pytorch",
    **kw,
) -> LatentTextToImagePipeline:
    """Load a pipeline from a folder, a single file or the embedded default (see module docstring)."""
    unknown = sorted(set(kw) - set(Accelerations.names()) - {"config", "scheduler"})
    if unknown:
        raise TypeError(f"Unknown load option(s) {', '.join(unknown)}; valid: config, scheduler, "
                        f"{', '.join(Accelerations.names())}.")
    accelerations = Accelerations(**{k: kw[k] for k in Accelerations.names() if k in kw})
    path = resolve_model_path(model)
    if backend == "pytorch":
        pipe = load_torch_pipeline(path, device, dtype, allow_pickle, kw.get("config"), accelerations)
    elif backend == "onnx":
        from ldm_pipeline.onnx_backend import load_onnx_pipeline

        check_onnx_family(path, kw.get("config"))

        pipe = load_onnx_pipeline(path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                  config=kw.get("config"), accelerations=accelerations)
    else:
        raise ModelLoadError(f"Unknown backend {backend!r}; valid: {', '.join(BACKENDS)}.")
    pipe.recommended = recommended_settings(path)
    from ldm_pipeline.scheduler_swap import swap_scheduler, use_trailing_spacing_if_zero_terminal_snr

    if kw.get("scheduler"):
        swap_scheduler(pipe, kw["scheduler"])
    else:
        use_trailing_spacing_if_zero_terminal_snr(pipe)
    return pipe


def load_torch_pipeline(path: Path, device, dtype, allow_pickle: bool, config, accelerations: Accelerations):
    device = select_device(device)
    pipe = load_components(path, resolve_dtype(dtype), allow_pickle, config)
    if not accelerations.cpu_offload or device.type != "cuda":
        pipe.to(device)
    apply_accelerations(pipe, accelerations, device)
    return pipe


def load_components(path: Path, dtype: torch.dtype, allow_pickle: bool, config) -> LatentTextToImagePipeline:
    """The model's PyTorch networks as stored (CPU, eager, the model's own scheduler), checked and hashed."""
    if path.is_dir():
        pipe = load_folder(path, dtype, allow_pickle)
    else:
        pipe = load_single_file(path, dtype, allow_pickle, config)
    check_components_fit(pipe, path)
    pipe.model_id, pipe.model_hash = str(path), model_hash(path)
    return pipe


RECOMMENDED_KEYS = ("num_inference_steps", "guidance_scale")


def recommended_settings(path: Path) -> dict:
    """`defaults` of a model folder's `record.json` (written by the shapes recipe's export), else {}."""
    record = path / "record.json"
    if not record.is_file():  # also a single .safetensors file: no folder, no record
        return {}
    defaults = json.loads(record.read_text()).get("defaults", {})
    return {k: defaults[k] for k in RECOMMENDED_KEYS if k in defaults}


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"No model given and the embedded default model is missing: {DEFAULT_MODEL_DIR} has no "
                "model_index.json. Pass a model folder or .safetensors file, or install a build that ships the "
                "default model."
            )
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no such file or folder. Pass a diffusers model folder (with model_index.json) or a "
            ".safetensors checkpoint; models are never downloaded."
        )
    return path


# ---------------------------------------------------------------- folders


def check_folder(path: Path, allow_pickle: bool) -> None:
    """Fail early, naming the file, for the usual ways a folder is broken."""
    if (path / "unet" / "model.onnx").is_file():
        raise ModelLoadError(f"{path}: an ONNX export; load it with backend='onnx' (--backend onnx).")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers model folder (model_index.json is missing).")
    expected = used_components(path, COMPONENTS + FAMILY_EXTRA_COMPONENTS[model_family(path)])
    missing = [c for c in expected if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path}: missing component folder(s) {', '.join(missing)}/.")
    for component in [c for c in expected if c in WEIGHT_COMPONENTS + ("text_encoder_2",)]:
        folder = path / component
        safetensors = sorted(folder.glob("*.safetensors"))
        pickles = [f for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
        if not safetensors and not pickles:
            raise ModelLoadError(f"{folder}: no weights (.safetensors) found.")
        if not safetensors and not allow_pickle:
            raise ModelLoadError(
                f"{folder}: only pickle weights ({pickles[0].name}), which can run code when loaded. Convert them "
                "to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the source."
            )
        for file in safetensors:
            check_safetensors(file)


def read_index(path: Path) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: model_index.json is unreadable: {error}") from error


def used_components(path: Path, names: tuple[str, ...]) -> list[str]:
    """The components the folder has (an SDXL refiner's index says `text_encoder: [null, null]`)."""
    index = read_index(path)
    return [c for c in names if index.get(c, [None, "absent"]) != [None, None]]


def model_family(path: Path) -> str:
    """"sd" (1.x / 2.x) or "sdxl" from model_index.json; families we do not run raise `ModelLoadError`."""
    index = read_index(path)
    name = str(index.get("_class_name", ""))
    if "transformer" in index or "StableDiffusion3" in name or "Flux" in name:
        raise ModelLoadError(
            f"{path}: a {name or 'transformer'} model (SD3 / Flux family, a transformer instead of a UNet); this "
            "pipeline runs SD 1.x / 2.x and SDXL UNets. Use the stock diffusers pipeline (DiffusionPipeline."
            "from_pretrained) with our rectified-flow samplers (custom_schedulers) as its scheduler.")
    return "sdxl" if "text_encoder_2" in index else "sd"


def path_family(path: Path, config=None) -> str:
    """The family of a model path before loading it: its folder's (or its config folder's) model_index.json;
    an ONNX export or a single file without a config counts as "sd" (its loader says what is missing)."""
    folder = path if path.is_dir() else Path(config) if config is not None else None
    if folder is None or not (folder / "model_index.json").is_file():
        return "sd"
    return model_family(folder)


def check_onnx_family(path: Path, config=None) -> None:
    """The ONNX export covers SD 1.x / 2.x (one text encoder, no added conditioning): SDXL is refused by name."""
    if path_family(path, config) == "sdxl":
        raise ModelLoadError(f"{path}: an SDXL model; the ONNX backend exports and runs SD 1.x / 2.x models. Use "
                             "the PyTorch backend (backend='pytorch', --backend pytorch).")


def family_pipeline(family: str):
    """The pipeline class of a model family (imported here: diffusers' pipelines, models and loaders)."""
    if family == "sdxl":
        from ldm_pipeline.sdxl import LatentSDXLPipeline

        return LatentSDXLPipeline
    from ldm_pipeline.diffusers_pipeline import LatentTextToImagePipeline

    return LatentTextToImagePipeline


def check_safetensors(file: Path) -> None:
    """Read the header and check the data length: a truncated or corrupt file fails here."""
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as error:
        raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({error}).") from error


def load_folder(path: Path, dtype: torch.dtype, allow_pickle: bool) -> LatentTextToImagePipeline:
    check_folder(path, allow_pickle)
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype; the old name works in both
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            family = model_family(path)
            pipe = family_pipeline(family).from_pretrained(
                str(path), torch_dtype=dtype, local_files_only=True, use_safetensors=None if allow_pickle else True
            )
            logger.info("%s: loaded a %s model", path, "Stable Diffusion XL" if family == "sdxl" else "Stable Diffusion")
            return pipe
    except Exception as error:
        raise ModelLoadError(f"{path}: could not load the model: {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------- single files


def load_single_file(
    path: Path, dtype: torch.dtype, allow_pickle: bool, config: str | os.PathLike | None
) -> LatentTextToImagePipeline:
    """An LDM-layout checkpoint through diffusers' `from_single_file`, offline, with a local config folder."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path}: {path.suffix} is a pickle format, which can run code when loaded. Use a .safetensors file, or "
            "pass allow_pickle=True (--allow-pickle) if you trust the source."
        )
    if path.suffix != ".safetensors" and path.suffix.lower() not in PICKLE_SUFFIXES:  # diffusers: case-sensitive
        raise ModelLoadError(f"{path}: unknown model file type {path.suffix!r}; expected .safetensors or a folder.")
    if path.suffix == ".safetensors":
        check_safetensors(path)
    if config is None:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint has no configs or tokenizer and nothing is downloaded; pass "
            "config=<diffusers folder of the same architecture> (--config), e.g. a local Stable Diffusion 1.5 "
            "folder (its config files and tokenizer are enough)."
        )
    check_config_folder(Path(config))
    try:
        family = model_family(Path(config))  # an SDXL config folder: an SDXL checkpoint (conditioner.embedders.*)
        return family_pipeline(family).from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=dtype
        )
    except Exception as error:
        raise ModelLoadError(f"{path}: could not load the checkpoint: {type(error).__name__}: {error}") from error


def check_config_folder(config: Path) -> None:
    if not (config / "model_index.json").is_file():
        raise ModelLoadError(f"{config}: config= must be a diffusers folder with model_index.json.")
    missing = [c for c in used_components(config, COMPONENTS + FAMILY_EXTRA_COMPONENTS[model_family(config)])
               if not (config / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{config}: config folder lacks {', '.join(missing)}/.")


# ---------------------------------------------------------------- checks and hashes


def check_components_fit(pipe: LatentTextToImagePipeline, path: Path) -> None:
    """Components that load one by one but cannot work together."""
    unet, vae = pipe.unet.config, pipe.vae.config
    encoders = pipe._text_encoders()  # SDXL: both (a refiner: encoder 2 only)
    width = sum(e.config.hidden_size for e in encoders)
    if unet.cross_attention_dim != width:
        raise ModelLoadError(
            f"{path}: the UNet attends to {unet.cross_attention_dim}-dim text features but the text encoder "
            f"gives {width}-dim ones{' (both encoders together)' if len(encoders) > 1 else ''}; unet/ and "
            "the text encoder(s) come from different models."
        )
    if unet.in_channels != vae.latent_channels:
        raise ModelLoadError(
            f"{path}: the UNet takes {unet.in_channels} input channels but the VAE makes {vae.latent_channels}-channel "
            "latents (a 9-channel inpainting UNet is not supported; use a regular model with mask_image)."
        )


_HASH_CACHE: dict[tuple, str] = {}


def file_sha256(file: Path) -> str:
    key = (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def model_hash(path: Path) -> str:
    """sha256 of a single file (its first 10 hex digits are A1111's "Model hash"), or, for a
    folder, sha256 over its weight and config files' relative paths and sha256s."""
    if path.is_file():
        return file_sha256(path)
    files = sorted(
        f for f in path.rglob("*")
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt") + PICKLE_SUFFIXES and not f.name.startswith(".")
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(json.dumps([str(f.relative_to(path)), file_sha256(f)]).encode())
    return digest.hexdigest()
