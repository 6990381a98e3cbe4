"""Training checkpoints without pickle, written atomically, verified before they are loaded.

A checkpoint folder holds safetensors and JSON only:

    model.safetensors, model_1.safetensors ...   the trained modules (safetensors' save_model/load_model)
    optimizer.safetensors, ema.safetensors ...   tensors of a state_dict; its other values as JSON in the header
    lr_scheduler.json                           a state_dict with no tensors
    random_states_<rank>.safetensors             python/numpy/torch RNG states of each process
    training_state.json                          step, format, and the sha256 of every file above

accelerate's `save_state` cannot write this: it hard-codes `torch.save` (pickle) for optimizers, schedulers,
RNG states and registered objects, and `load_custom_state` unpickles with `weights_only=False`
(accelerate/checkpointing.py), so its pre-hooks, which only see model weights, cannot avoid pickle. We use
accelerate's process handling (`unwrap_model`, `wait_for_everyone`, `process_index`) and its `load_state`
only for checkpoints of the older pickle format, behind `--allow_pickle`.

A rename within one file system is atomic, so a kill at any moment leaves either the previous set of
complete checkpoints or that set plus the new one, never a half-written `checkpoint-<step>`. Stale
temporary folders are removed on the next save. Only the last `keep` checkpoints are kept. `latest`
skips a damaged checkpoint (a file missing or not matching its hash), names the file, and resumes from
the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from ldm_pipeline.loading import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
FORMAT = 2  # 2: safetensors + JSON; absent: accelerate's save_state (pickle), loadable only with --allow_pickle
TAGS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: damaged, not matching this run, or it would need pickle."""


@dataclass
class TrainingState:
    """Everything a resumed run restores besides the step: prepared modules and stateful objects."""

    accelerator: object
    models: list[torch.nn.Module]
    optimizer: object
    lr_scheduler: object
    ema: object | None = None

    def objects(self) -> dict[str, object]:
        """Stateful objects (state_dict/load_state_dict) by file name."""
        found = {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "ema": self.ema,
                 "grad_scaler": getattr(self.accelerator, "scaler", None)}
        return {name: obj for name, obj in found.items() if obj is not None}


# ---------------------------------------------------------------- state_dicts as JSON + tensors


def encode(value, tensors: dict[str, torch.Tensor], path: str = "state"):
    """A JSON-able tree of `value`; its tensors go into `tensors` under their path in the tree."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in TAGS for k in value):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[encode(k, tensors, f"{path}.key{i}"), encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    raise TypeError(f"{path}: cannot store a {type(value).__name__} in a checkpoint without pickle.")


def decode(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of `encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.array(tree["__ndarray__"], dtype=tree["dtype"])
    if "__tuple__" in tree:
        return tuple(decode(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {decode(k, tensors): decode(v, tensors) for k, v in tree["__items__"]}
    return {k: decode(v, tensors) for k, v in tree.items()}


def save_tree(folder: Path, name: str, value) -> str:
    """`name.json`, or `name.safetensors` (the JSON in its header) when the value holds tensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(encode(value, tensors))
    if not tensors:
        (folder / f"{name}.json").write_text(tree)
        return f"{name}.json"
    save_file(tensors, folder / f"{name}.safetensors", metadata={"format": "pt", "tree": tree})
    return f"{name}.safetensors"


def load_tree(folder: Path, name: str):
    """The value `save_tree` wrote (the file the checkpoint's manifest lists, whichever of the two)."""
    if f"{name}.json" in read_state(folder)["files"]:
        return decode(json.loads((folder / f"{name}.json").read_text()), {})
    with safe_open(folder / f"{name}.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return decode(json.loads(handle.metadata()["tree"]), tensors)


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- folders


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{checkpoint / STATE_FILE} is damaged ({error}).") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{checkpoint / STATE_FILE} is damaged (no integer 'step').")
    return state


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- saving


def write_state_files(state: TrainingState, folder: Path) -> None:
    """The main process writes modules and objects; every process writes its own RNG states."""
    accelerator = state.accelerator
    if accelerator.is_main_process:
        for i, model in enumerate(state.models):
            save_model(accelerator.unwrap_model(model), str(folder / f"model{f'_{i}' if i else ''}.safetensors"))
        for name, obj in state.objects().items():
            save_tree(folder, name, obj.state_dict())
    save_tree(folder, f"random_states_{accelerator.process_index}", rng_states())


def save_checkpoint(state: TrainingState, output_dir: str | Path, step: int, keep: int | None) -> Path:
    """Write into a temporary folder, hash every file, rename it to checkpoint-<step> (all ranks call this)."""
    accelerator = state.accelerator
    root = checkpoint_dir(output_dir)
    tmp = root / f".tmp-checkpoint-{step}"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    write_state_files(state, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "format": FORMAT, "files": files}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename never publishes data still in the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# ---------------------------------------------------------------- checking and loading


def pickle_files(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


def damage(checkpoint: Path) -> str | None:
    """Why a format-2 checkpoint cannot be trusted to load (a missing or altered file), or None."""
    state = read_state(checkpoint)
    if state.get("format") is None:
        return None  # accelerate's format keeps no hashes (and loads only with --allow_pickle)
    if not isinstance(state.get("files"), dict):
        return f"{checkpoint / STATE_FILE} is damaged (no file list)"
    for name, digest in state["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != digest:
            return f"{path} is damaged (its sha256 does not match {STATE_FILE})"
    return None


def check_pickle_policy(checkpoint: Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint that would need (or carries) pickle files unless --allow_pickle is given."""
    pickles = pickle_files(checkpoint)
    if not pickles:
        return
    legacy = read_state(checkpoint).get("format") is None
    if allow_pickle:
        if not legacy:
            logger.warning("%s holds pickle files it does not need (%s); they are not loaded.", checkpoint, ", ".join(pickles))
        return
    what = ("was written in accelerate's pickle format by an older version" if legacy
            else "holds pickle files this version never writes (someone put them there)")
    raise CheckpointError(
        f"Refusing to resume from {checkpoint}: it {what}: {', '.join(pickles)}. Loading a pickle can run "
        "arbitrary code. Pass --allow_pickle only if you trust these files, or start a fresh run."
    )


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None, allow_pickle: bool = False) -> Path | None:
    """The folder to resume from ('latest': the newest intact one, None if there is none yet), checked."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE_FILE}).")
        check_pickle_policy(path, allow_pickle)
        if problem := damage(path):
            raise CheckpointError(f"Cannot resume from {path}: {problem}.")
        return path
    return newest_intact(list_checkpoints(output_dir), allow_pickle)


def newest_intact(found: list[Path], allow_pickle: bool) -> Path | None:
    damaged = []
    for checkpoint in reversed(found):
        check_pickle_policy(checkpoint, allow_pickle)
        try:
            problem = damage(checkpoint)
        except CheckpointError as error:
            problem = str(error)
        if problem is None:
            if damaged:
                logger.warning("Falling back to %s, the newest intact checkpoint.", checkpoint)
            return checkpoint
        logger.warning("Skipping checkpoint %s: %s.", checkpoint.name, problem)
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"No intact checkpoint to resume from: {'; '.join(damaged)}.")
    return None


def load_checkpoint(state: TrainingState, checkpoint: Path) -> int:
    """Restore everything `save_checkpoint` wrote (or, for a pickle-format checkpoint, what accelerate wrote)."""
    if read_state(checkpoint).get("format") is None:
        return load_pickle_checkpoint(state, checkpoint)
    accelerator = state.accelerator
    current = "the checkpoint"
    try:
        for i, model in enumerate(state.models):
            current = f"model{f'_{i}' if i else ''}.safetensors"
            load_model(accelerator.unwrap_model(model), str(checkpoint / current))  # copied into the params in place
        for name, obj in state.objects().items():
            current = name
            obj.load_state_dict(load_tree(checkpoint, name))
        if state.ema is not None:
            state.ema.to(accelerator.device)
        load_rng_states(checkpoint, accelerator.process_index)
    except (RuntimeError, KeyError, ValueError, TypeError, SafetensorError, OSError) as error:
        raise CheckpointError(f"{checkpoint}: {current} does not fit this run ({error}); resume with the "
                              "options the checkpoint was written with.") from None
    return read_state(checkpoint)["step"]


def load_rng_states(checkpoint: Path, rank: int) -> None:
    name = f"random_states_{rank}"
    if f"{name}.safetensors" in read_state(checkpoint)["files"]:
        set_rng_states(load_tree(checkpoint, name))
    else:
        logger.warning("%s has no %s (written with fewer processes): this process's RNG is not restored.", checkpoint, name)


def load_pickle_checkpoint(state: TrainingState, checkpoint: Path) -> int:
    """A checkpoint of accelerate's save_state (scheduler and EMA registered in this order); --allow_pickle only."""
    logger.warning("Loading pickle files of %s (--allow_pickle).", checkpoint)
    accelerator = state.accelerator
    accelerator.register_for_checkpointing(state.lr_scheduler, *([state.ema] if state.ema is not None else []))
    accelerator.load_state(str(checkpoint))
    return read_state(checkpoint)["step"]
