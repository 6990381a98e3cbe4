"""Device, dtype and speed/memory switches for a loaded pipeline.

* device: "cuda", then "mps", then "cpu" when none is given;
* dtype: fp32 (default), fp16 or bf16;
* attention: PyTorch scaled-dot-product attention (SDPA) by default; `xformers=True`
  uses xformers' memory-efficient attention when xformers is installed *and* the
  pipeline runs on CUDA, and otherwise logs why and stays on SDPA;
* attention slicing, VAE slicing/tiling (large images), model CPU offload (CUDA only),
  `torch.compile` of the UNet (opt-in), or `trace`: `torch.jit.trace` + freeze of the UNet per
  input shape (`ldm_pipeline.tracing`; ~2x per step on CPU at small sizes, a trace per new shape).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, fields

import torch

logger = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Accelerations:
    """Opt-in switches applied after loading (see the module docstring)."""

    xformers: bool = False
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    compile: bool = False
    trace: bool = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else cuda, then mps, then cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"Unsupported dtype {dtype}; use float32, float16 or bfloat16.")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def xformers_unavailable_reason(device: torch.device) -> str | None:
    """Why xformers cannot be used here, or None if it can."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'ldm-toolkit[xformers]')"
    if device.type != "cuda":
        return f"xformers' memory-efficient attention needs a CUDA device, the pipeline is on {device.type}"
    return None


def set_attention(pipe, xformers: bool, device: torch.device) -> str:
    """Use SDPA, or xformers when asked and possible; returns the backend in use."""
    if xformers:
        reason = xformers_unavailable_reason(device)
        if reason is None:
            try:
                pipe.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as error:  # a broken xformers build must not stop generation
                reason = f"enabling xformers failed: {error}"
        logger.warning("xformers=True ignored: %s; using PyTorch SDPA attention.", reason)
    from diffusers.models.attention_processor import AttnProcessor2_0  # here: the ONNX backend imports this module

    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def apply_accelerations(pipe, options: Accelerations, device: torch.device) -> None:
    """Apply the switches; records the attention backend in `pipe.attention_backend`."""
    pipe.attention_backend = set_attention(pipe, options.xformers, device)
    if options.attention_slicing:
        pipe.unet.set_attention_slice("auto")
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.cpu_offload:
        if device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            logger.warning("cpu_offload=True ignored: model CPU offload needs a CUDA device, the pipeline is on %s.",
                           device.type)
    if options.compile and options.trace:
        raise ValueError("compile=True and trace=True both replace the UNet; choose one.")
    if options.compile:
        pipe.unet = torch.compile(pipe.unet)
    if options.trace:
        from ldm_pipeline.tracing import TracedUNet

        pipe.unet = TracedUNet(pipe.unet)
