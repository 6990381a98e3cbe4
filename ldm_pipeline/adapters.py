"""LoRA and textual-inversion files: safetensors always, pickle files only when asked for.

diffusers' loaders fall back to `torch.load` for `.pt`, `.bin` and `.ckpt` files (A1111
embeddings are often `.pt`). `pickle_free_kwargs` checks the sources named in a loader call
and refuses a pickle file unless the caller passed `allow_pickle=True`; otherwise it adds
`use_safetensors=True`, which keeps diffusers from falling back to a pickle file by itself.
Even with the flag, diffusers unpickles with `weights_only=True` (tensors, no code).
"""

from __future__ import annotations

import os
from pathlib import Path

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
