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
* `ldm-generate` / `python -m ldm_pipeline`: batch generation; see `generate`.
"""

from ldm_pipeline import import_noise  # noqa: F401  (before peft and transformers load)
from ldm_pipeline.guidance import Guidance, GuidanceInterval
from ldm_pipeline.loading import ModelLoadError, load_pipeline
from ldm_pipeline.options import GenerationOptions, InvalidOptions
from ldm_pipeline.pipeline import (
    GenerationCancelled,
    LatentPipelineOutput,
    LatentTextToImagePipeline,
    NonFiniteLatents,
    StepInfo,
)
from ldm_pipeline.scheduler_swap import SchedulerSwapError, SwapReport, available_schedulers, swap_scheduler
from ldm_pipeline.sdxl import LatentSDXLPipeline

__all__ = [
    "GenerationCancelled", "GenerationOptions", "Guidance", "GuidanceInterval", "InvalidOptions",
    "LatentPipelineOutput", "LatentSDXLPipeline", "LatentTextToImagePipeline", "ModelLoadError", "NonFiniteLatents", "SchedulerSwapError", "StepInfo", "SwapReport",
    "available_schedulers", "load_pipeline", "swap_scheduler",
]
