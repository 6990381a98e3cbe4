"""ldm_pipeline: latent text-to-image generation on top of diffusers.

Public entry points (stable names):

* `load_pipeline(model=None, *, device=None, dtype=None, allow_pickle=False, **kw)`
  -> `LatentTextToImagePipeline`, or `LatentSDXLPipeline` for SDXL (no model: the embedded default
  model); see `loading` and `sdxl`.
* `swap_scheduler(pipe, name, **overrides)` -> `SwapReport`; see `scheduler_swap`.
* `LatentTextToImagePipeline.__call__(prompt, **options)` -> `LatentPipelineOutput`
  (images, seeds, unet_evaluations, recipes); options are `GenerationOptions` (`options`:
  the one settings record, its defaults, `check()`, recipe round trip, seed rule); stock diffusers'
  call arguments too (`generator`, `latents`, `eta`, `timesteps` / `sigmas`, `callback_on_step_end`,
  `ip_adapter_image`, `return_dict=False` -> `(images, None)`; `noise_source`, `step_callbacks`).
* `GenerationService` / `ServiceRequest`: a loaded model serving many requests (the UI); see `service`.
* `metadata.write_png / read_png / parse_parameters / format_parameters`: PNG metadata.
* `hires.HiresFix`: the hires fix (`pipe(..., hires=HiresFix(scale=2, steps=10, strength=0.5))`); see `hires`.
* `xyz.XYZPlot` / `xyz.run_plot`: A1111's X/Y/Z plot over a `GenerationService`; see `xyz`.
* `ldm-generate` / `python -m ldm_pipeline`: batch generation; see `generate`.

The names below are imported on first use (PEP 562), so that `import ldm_pipeline.generate` or
`import ldm_pipeline.metadata` loads only the modules that job needs (a cold start imports neither
diffusers' pipelines and models nor transformers unless the PyTorch backend is used).
"""

from importlib import import_module

from ldm_pipeline import import_noise  # noqa: F401  (before peft and transformers load)

_EXPORTS = {  # public name -> the module that defines it
    "Guidance": "guidance", "GuidanceInterval": "guidance",
    "ModelLoadError": "loading", "load_pipeline": "loading",
    "GenerationOptions": "options", "InvalidOptions": "options",
    "GenerationCancelled": "pipeline", "LatentPipelineOutput": "pipeline", "NonFiniteLatents": "pipeline",
    "StepInfo": "pipeline", "LatentTextToImagePipeline": "diffusers_pipeline", "LatentSDXLPipeline": "sdxl",
    "SchedulerSwapError": "scheduler_swap", "SwapReport": "scheduler_swap",
    "available_schedulers": "scheduler_swap", "swap_scheduler": "scheduler_swap",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"ldm_pipeline.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
