"""Optimizers by name (`--optimizer`), with their options from `--optimizer_args` or the config file.

    adamw               torch.optim.AdamW (Loshchilov & Hutter 2019)
    adamw8bit           bitsandbytes AdamW8bit, 8-bit optimizer states (Dettmers et al. 2022); falls back to
                        AdamW with a warning where bitsandbytes or its backend is missing
    adafactor           transformers' Adafactor (Shazeer & Stern 2018), with our fixed learning rate
    prodigy             prodigyopt's Prodigy (Mishchenko & Defazio 2023): estimates the step size; use lr ~ 1.0
    lion                lion-pytorch's Lion (Chen et al. 2023): sign updates; use a 3-10x smaller lr than AdamW
    schedulefree_adamw  schedulefree's AdamWScheduleFree (Defazio et al. 2024): no lr schedule (use
                        --lr_scheduler constant); evaluated and saved at its averaged weights

Each takes parameter groups (the text encoder may have its own lr) and starts from our AdamW
settings (betas, weight decay, epsilon) where it has the same option; `optimizer_args` override them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import yaml

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion", "schedulefree_adamw")
PACKAGES = {"prodigy": "prodigyopt", "lion": "lion-pytorch", "schedulefree_adamw": "schedulefree",
            "adamw8bit": "bitsandbytes"}


def parse_optimizer_args(values: list[str] | dict | None) -> dict[str, Any]:
    """`key=value` strings (values read as YAML: 0.5, true, [0.9, 0.99]), or a mapping (from Python)."""
    if not values:
        return {}
    if isinstance(values, dict):
        return dict(values)
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--optimizer_args {item!r} is not key=value (e.g. --optimizer_args d_coef=0.5).")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _adam_defaults(o) -> dict:
    return {"lr": o.learning_rate, "betas": (o.adam_beta1, o.adam_beta2), "weight_decay": o.adam_weight_decay,
            "eps": o.adam_epsilon}


def _adamw(groups, o, args):
    return torch.optim.AdamW(groups, **{**_adam_defaults(o), **args})


def _bitsandbytes_works() -> str | None:
    """None if an 8-bit AdamW step runs here, else why not."""
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096))
        probe.grad = torch.ones(4096)
        bnb.optim.AdamW8bit([probe]).step()
        return None
    except Exception as error:  # ImportError, or a RuntimeError from a missing native backend
        return f"{type(error).__name__}: {error}"


def _adamw8bit(groups, o, args):
    problem = _bitsandbytes_works()
    if problem:
        logger.warning("--optimizer adamw8bit needs bitsandbytes with a backend for this device (%s); "
                       "training with 32-bit AdamW instead (pip install bitsandbytes).", problem)
        return _adamw(groups, o, args)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, **{**_adam_defaults(o), **args})


def _adafactor(groups, o, args):
    from transformers.optimization import Adafactor

    # Our lr and schedule, not Adafactor's relative step size (as kohya's and diffusers' scripts use it).
    defaults = {"lr": o.learning_rate, "scale_parameter": False, "relative_step": False, "warmup_init": False,
                "weight_decay": o.adam_weight_decay}
    return Adafactor(groups, **{**defaults, **args})


def _prodigy(groups, o, args):
    from prodigyopt import Prodigy

    if o.learning_rate < 0.1:
        logger.warning("Prodigy estimates the step size itself and expects --learning_rate ~ 1.0 (got %g).",
                       o.learning_rate)
    return Prodigy(groups, **{**_adam_defaults(o), **args})


def _lion(groups, o, args):
    from lion_pytorch import Lion

    return Lion(groups, **{"lr": o.learning_rate, "betas": (0.9, 0.99), "weight_decay": o.adam_weight_decay, **args})


def _schedulefree_adamw(groups, o, args):
    from schedulefree import AdamWScheduleFree

    if o.lr_scheduler != "constant":
        raise ValueError("--optimizer schedulefree_adamw replaces the learning-rate schedule: use --lr_scheduler "
                         "constant (and its own warm-up: --optimizer_args warmup_steps=N).")
    return AdamWScheduleFree(groups, **{**_adam_defaults(o), **args})


BUILDERS: dict[str, Callable] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit, "adafactor": _adafactor, "prodigy": _prodigy, "lion": _lion,
    "schedulefree_adamw": _schedulefree_adamw,
}


def build_optimizer(name: str, groups: list[dict], options, optimizer_args=None) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter groups; `options` are the OptimizationOptions."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    args = parse_optimizer_args(optimizer_args)
    try:
        return BUILDERS[name](groups, options, args)
    except ImportError as error:
        raise ImportError(f"--optimizer {name} needs the package {PACKAGES.get(name, error.name)} "
                          f"(pip install {PACKAGES.get(name, error.name)}, or the project's [train] extra).") from error
    except TypeError as error:
        raise ValueError(f"--optimizer_args {args} do not fit --optimizer {name}: {error}") from error
