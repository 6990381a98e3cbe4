"""Saving trained adapters in the formats people load them in, from one trained adapter.

* diffusers: `pytorch_lora_weights.safetensors` (`StableDiffusionPipeline.save_lora_weights`, loaded by
  `pipe.load_lora_weights(folder)`);
* kohya / AUTOMATIC1111 / ComfyUI: `pytorch_lora_weights_kohya.safetensors` with `lora_unet_...` and
  `lora_te_...` keys (SDXL: `lora_te1_...`, `lora_te2_...`), `lora_down`/`lora_up` weights and an `.alpha`
  per module (diffusers' `convert_state_dict_to_kohya`; `pipe.load_lora_weights` converts it back);
* peft: an adapter folder per model (`unet/`, `text_encoder/`, `text_encoder_2/`: adapter_config.json and
  adapter_model.safetensors), the only one of the three that describes LoHa and LoKr.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import PeftConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldm_pipeline.atomic import atomic_directory

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # diffusers' names


def trained_models(unet, text_encoder, text_encoder_2=None) -> dict[str, torch.nn.Module]:
    """{'unet': ..., 'text_encoder': ..., 'text_encoder_2': ...} of the models that carry an adapter (the text
    encoders are optional; SDXL has two)."""
    named = (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    return {name: model for name, model in named if model is not None}


def save_adapters(directory: Path, unet, text_encoder=None, lora_format: str = "both", *, text_encoder_2=None) -> Path:
    """Write the adapter(s) of `unet` (and the text encoders) in `lora_format` (diffusers|kohya|both|peft), atomically."""
    models = trained_models(unet, text_encoder, text_encoder_2)
    with atomic_directory(directory) as tmp:
        if lora_format == "peft":
            for name, model in models.items():
                save_peft(tmp / name, model)
        if lora_format in ("diffusers", "both"):
            save_diffusers(tmp, models)
        if lora_format in ("kohya", "both"):
            save_file(kohya_state_dict(models), str(tmp / KOHYA_FILE), metadata=kohya_metadata(models["unet"]))
    return directory


def save_diffusers(directory: Path, models: dict[str, torch.nn.Module]) -> None:
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
              for name, model in models.items()}
    metadata = {f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict() for name, model in models.items()}
    saver = StableDiffusionXLPipeline if "text_encoder_2" in models else StableDiffusionPipeline  # one file format
    saver.save_lora_weights(directory, **layers, **metadata, safe_serialization=True)


def kohya_state_dict(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """kohya keys by diffusers' converter, with two corrections.

    0. Module names are those of the checkpoint (transformers 5's CLIPTextModel dropped `text_model.`).
    1. The converter writes alpha = rank; the adapter's own lora_alpha is written instead (they differ
       whenever --lora_alpha is not the rank, and the scale alpha/rank would be lost).
    2. It names the text encoder `lora_te1_` (SDXL's first encoder; the second is `lora_te2_`); SD 1.x/2.x
       files use `lora_te_`.
    """
    prefixed = {f"{name}.{checkpoint_name(model, key)}": value for name, model in models.items()
                for key, value in get_peft_model_state_dict(model).items()}
    alphas = {KOHYA_PREFIXES[name]: float(model.peft_config["default"].lora_alpha) for name, model in models.items()}
    sd = "text_encoder_2" not in models
    result = {}
    for key, value in convert_state_dict_to_kohya(prefixed).items():
        if key.endswith(".alpha"):
            value = torch.tensor(next(a for prefix, a in alphas.items() if key.startswith(prefix)))
        key = key.replace("lora_te1_", "lora_te_", 1) if sd and key.startswith("lora_te1_") else key
        result[key] = value.detach().contiguous()
    return result


def checkpoint_name(model: torch.nn.Module, key: str) -> str:
    """A CLIP text encoder's module path as SD checkpoints (and kohya files) spell it: text_model.encoder..."""
    is_clip_text = type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model")
    return f"text_model.{key}" if is_clip_text else key


def kohya_metadata(unet) -> dict[str, str]:
    """The `ss_*` header fields kohya's sd-scripts write (UIs show them)."""
    config = unet.peft_config["default"]
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
            "ss_network_alpha": str(config.lora_alpha)}


def save_peft(directory: Path, model: torch.nn.Module) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(directory))
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(directory / PEFT_WEIGHTS))


def load_peft(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Inject a peft-format adapter folder (LoRA, LoHa, LoKr...) into `model` and load its weights."""
    config_file = Path(directory) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} holds no adapter_config.json (a peft adapter folder written with "
                                "--lora_format peft).")
    config = PeftConfig.from_peft_type(**json.loads(config_file.read_text()))
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, load_file(str(Path(directory) / PEFT_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"Adapter weights in {directory} do not fit the model: {result.unexpected_keys[:5]}")
    return model
