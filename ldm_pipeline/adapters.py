"""LoRA and textual-inversion files: the pickle guard, A1111 `<lora:NAME:W>` tags, A1111 hashes.

The CLI's `--lora PATH[:SCALE]`, `--embedding PATH` and `<lora:NAME:W>` tags (resolved in
`--lora-dir` only) become `LoraFile`s; `activate_loras` / `load_embeddings` apply them and return
the records (name, A1111 hash, scale) that recipes and the `Lora hashes:` infotext carry.

Safetensors always, pickle files only when asked for:

diffusers' loaders fall back to `torch.load` for `.pt`, `.bin` and `.ckpt` files (A1111
embeddings are often `.pt`). `pickle_free_kwargs` checks the sources named in a loader call
and refuses a pickle file unless the caller passed `allow_pickle=True`; otherwise it adds
`use_safetensors=True`, which keeps diffusers from falling back to a pickle file by itself.
Even with the flag, diffusers unpickles with `weights_only=True` (tensors, no code).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAFE_SUFFIX = ".safetensors"


class PickleRefused(ValueError):
    """A pickle file was named without `allow_pickle=True`."""


def pickle_free_kwargs(sources, kwargs: dict, allow_pickle: bool) -> dict:
    """The loader kwargs to use; raise `PickleRefused` for a pickle file when `allow_pickle` is False."""
    if allow_pickle:
        return kwargs
    weight_name = kwargs.get("weight_name")
    names = [weight_name] if weight_name else []
    items = sources if isinstance(sources, (list, tuple)) else [sources]
    names += [str(s) for s in items if isinstance(s, (str, os.PathLike)) and Path(s).is_file()]
    pickled = [n for n in names if not str(n).endswith(SAFE_SUFFIX)]
    if pickled:
        raise PickleRefused(
            f"{pickled[0]} is a pickle file (.pt/.bin/.ckpt), which can run code when loaded; convert it to "
            f".safetensors, or pass allow_pickle=True (ldm-generate: --allow-pickle) if you trust its source."
        )
    return {**kwargs, "use_safetensors": True}


# ---------------------------------------------------------------- files named on the command line or in a prompt

LORA_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?[^>]*>")  # A1111: <lora:NAME>, <lora:NAME:0.8>


@dataclass(frozen=True)
class LoraFile:
    """One LoRA to apply: its file and its weight (A1111's multiplier)."""

    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem


def parse_lora_arg(text: str) -> LoraFile:
    """`PATH` or `PATH:SCALE` (a Windows drive letter is not a scale)."""
    path, sep, scale = text.rpartition(":")
    try:
        return LoraFile(Path(path), float(scale)) if sep and path else LoraFile(Path(text))
    except ValueError:
        return LoraFile(Path(text))


def prompt_loras(prompt: str, lora_dir: Path | None, suffixes=LORA_SUFFIXES) -> tuple[str, list[LoraFile]]:
    """The prompt without its `<lora:NAME:W>` tags, and the files they name in `lora_dir` (only there)."""
    found = [(m.group(1).strip(), m.group(2)) for m in LORA_TAG.finditer(prompt)]
    if not found:
        return prompt, []
    if lora_dir is None:
        raise ValueError(f"The prompt names LoRA(s) {', '.join(n for n, _ in found)} with <lora:NAME:W>: pass "
                         "--lora-dir DIR, the folder they are looked up in.")
    files = [LoraFile(lora_in_folder(name, lora_dir, suffixes), _weight(name, weight)) for name, weight in found]
    return " ".join(LORA_TAG.sub(" ", prompt).split()), files


def _weight(name: str, weight: str | None) -> float:
    try:
        return 1.0 if weight in (None, "") else float(weight)
    except ValueError:
        raise ValueError(f"<lora:{name}:{weight}>: the weight must be a number, e.g. <lora:{name}:0.8>.") from None


def lora_in_folder(name: str, folder: Path, suffixes=LORA_SUFFIXES) -> Path:
    """The file `folder/NAME.<suffix>`; names are plain file names, never paths (checked before the folder
    is even listed)."""
    if not name or "/" in name or "\\" in name or ".." in name:
        raise ValueError(f"<lora:{name}>: a LoRA name is a file name in --lora-dir, without '/', '\\' or '..'.")
    available = files_by_name(folder, suffixes)
    if name not in available:
        known = ", ".join(sorted(available)) or "none"
        raise ValueError(f"<lora:{name}>: no such LoRA in {folder}; available: {known}.")
    return available[name]


def files_by_name(folder: Path, suffixes=LORA_SUFFIXES) -> dict[str, Path]:
    """name (file stem) -> file, for the regular files of `folder` with one of `suffixes` (sorted by name)."""
    return {p.stem: p for p in sorted(Path(folder).iterdir()) if p.suffix in suffixes and p.is_file()}


def allowed_suffixes(allow_pickle: bool) -> tuple[str, ...]:
    """The adapter files a folder offers: safetensors, and the pickle formats only with `allow_pickle`."""
    return LORA_SUFFIXES if allow_pickle else (SAFE_SUFFIX,)


# ---------------------------------------------------------------- hashes as A1111 writes them


def lora_hash(path: Path) -> str:
    """A1111's `Lora hashes` value: the first 12 hex digits of kohya's/AddNet's sha256 of a safetensors
    file's tensor data (the bytes after the header), or of the whole file otherwise
    (A1111 extensions-builtin/Lora/network.py, modules/hashes.py: addnet_hash_safetensors)."""
    with open(path, "rb") as f:
        if Path(path).suffix == SAFE_SUFFIX:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def file_hash(path: Path) -> str:
    """A1111's `TI hashes` value: the first 12 hex digits of the file's sha256."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


# ---------------------------------------------------------------- applying them to a pipeline


def load_embeddings(pipe, paths: list[Path], allow_pickle: bool = False) -> list[dict]:
    """Load textual-inversion files; the trigger token is the file name, as in A1111. Returns their records
    (the pipeline's `load_textual_inversion` adds them to `pipe.embedding_records`)."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--embedding {path}: no such file.")
        pipe.load_textual_inversion(str(path), token=Path(path).stem, allow_pickle=allow_pickle)
    return pipe.embedding_records[len(pipe.embedding_records) - len(paths):]


def named_file(source, weight_name: str | None, default_name: str) -> Path | None:
    """The file a diffusers loader call names: a file, or a folder + `weight_name` (else diffusers' default
    name); None for a state dict, a hub id or anything that is not a local file."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    path = path / (weight_name or default_name) if path.is_dir() else path
    return path if path.is_file() else None


def file_record(path: Path | None, name: str, hasher) -> dict:
    """{"name", "hash"} for recipes and the infotext: a file's name (never its path) and A1111's hash."""
    return {"name": name, "hash": hasher(path) if path else None}


def lora_layers_enabled(model) -> bool:
    """False when `disable_lora()` switched the model's LoRA layers off (peft's `disable_adapters`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is not None and not layer.disable_adapters


def activate_loras(pipe, loras: list[LoraFile], allow_pickle: bool = False) -> list[dict]:
    """Make exactly `loras` active with their weights (loading files not loaded yet); returns their records."""
    loaded = set(pipe.get_list_adapters().get("unet", [])) if loras or _has_adapters(pipe) else set()
    records = [{"name": lora.name, "hash": lora_hash(lora.path), "scale": lora.scale} for lora in loras]
    names = [f"{r['name']}-{r['hash']}" for r in records]
    for lora, name in zip(loras, names):
        if name not in loaded:
            pipe.load_lora_weights(str(lora.path), adapter_name=name, allow_pickle=allow_pickle)
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    elif loaded:
        pipe.disable_lora()
    pipe.lora_records = records
    return records


def _has_adapters(pipe) -> bool:
    return bool(getattr(pipe.unet, "peft_config", None))


# ---------------------------------------------------------------- IP-Adapter inputs, as recipes record them


def ip_adapter_record(unet, image, image_embeds) -> dict | None:
    """What a recipe keeps of an IP-Adapter run: a sha256 of the image(s) (RGB pixels and size) or of the
    embeddings given, and the adapter's scale (`set_ip_adapter_scale`; per layer when the layers differ).
    The image itself is not stored: replaying needs it (`metadata.recipe_to_options` says so)."""
    if image is None and image_embeds is None:
        return None
    given = image if image is not None else image_embeds
    digest = hashlib.sha256()
    for item in given if isinstance(given, (list, tuple)) else [given]:
        digest.update(_input_bytes(item))
    scales = {name: list(p.scale) for name, p in unet.attn_processors.items() if isinstance(getattr(p, "scale", None), list)}
    distinct = {tuple(s) for s in scales.values()}
    scale = list(distinct.pop()) if len(distinct) == 1 else scales
    return {"image_sha256" if image is not None else "embeds_sha256": digest.hexdigest(), "scale": scale}


def _input_bytes(item) -> bytes:
    """The bytes an IP-Adapter input is hashed by: a PIL image's RGB pixels and size, an array's or tensor's values."""
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        return f"{item.size}".encode() + np.asarray(item.convert("RGB")).tobytes()
    if isinstance(item, (list, tuple)):
        return b"".join(map(_input_bytes, item))
    if hasattr(item, "detach"):  # a torch tensor
        item = item.detach().float().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(item))
    return f"{array.shape}{array.dtype}".encode() + array.tobytes()
