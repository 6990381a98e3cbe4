"""Helpers shared by the scheduler tests: a sampling loop, a toy model, loading k-diffusion's sampling.py."""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

BASE_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, nonlinear, timestep-dependent stand-in for a network."""
    return torch.tanh(x) * (0.5 + float(t) / 2000) + 0.1 * torch.cos(3 * x)


def sample_loop(scheduler, x_start: torch.Tensor, model=toy_model, seed: int = 0, step_kwargs=None,
                scales_input: bool = True):
    """The diffusers denoising loop from `x_start` (already multiplied by init_noise_sigma).

    `step_kwargs` go to `step` (e.g. diffusers' DDIM `eta`, or `generator`); FlowMatch schedulers have no
    `scale_model_input` (`scales_input=False`). Returns (model inputs stacked over steps, final sample)."""
    if step_kwargs is None:
        step_kwargs = {"generator": torch.Generator().manual_seed(seed)}
    x, inputs = x_start, []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if scales_input else x
        inputs.append(x_in)
        x = scheduler.step(model(x_in, t), t, x, **step_kwargs).prev_sample
    return torch.stack(inputs), x


def seeded(**step_kwargs) -> dict:
    """step kwargs with a fresh generator seeded 0 (the same noise on both sides of a comparison)."""
    return {"generator": torch.Generator().manual_seed(0), **step_kwargs}


def load_k_diffusion_sampling():
    """k-diffusion's `sampling.py` without importing the `k_diffusion` package.

    `import k_diffusion` fails here: its `__init__` imports modules that need torchvision and
    scikit-image, which are not installed (torchvision would replace the CPU torch). `sampling.py`
    itself needs only `from . import utils` for `append_dims`, so we register a minimal
    `k_diffusion` package whose `utils` provides that one helper, then load the file by path.
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    location = list(spec.submodule_search_locations)[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [location]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        """Append singleton dims to x until it has target_dims dims (k-diffusion's helper)."""
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    sampling_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{location}/sampling.py")
    sampling = importlib.util.module_from_spec(sampling_spec)
    sys.modules["k_diffusion.sampling"] = sampling
    sampling_spec.loader.exec_module(sampling)
    return sampling
