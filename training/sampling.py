"""Validation images: the model being trained, in the project's pipeline, with the scheduler it will ship with."""

from __future__ import annotations

from PIL import Image

from ldm_pipeline.pipeline import LatentTextToImagePipeline
from ldm_pipeline.sdxl import LatentSDXLPipeline
from training.load_and_save import Components, output_scheduler


def validation_pipeline(components: Components, scheduler_keys: dict) -> LatentTextToImagePipeline:
    """Our pipeline of the model's family (SD, or SDXL with both text encoders) over the components."""
    shared = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                  unet=components.unet, scheduler=output_scheduler(scheduler_keys))
    if components.family == "sdxl":
        return LatentSDXLPipeline(**shared, text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2)
    return LatentTextToImagePipeline(**shared)


def validation_images(pipe, prompts: list[str], steps: int, guidance_scale: float, size: int, seed: int) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed + i, so grids are comparable across steps and runs."""
    return pipe(
        list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, width=size, height=size,
        seed=seed, progress_bar=False,
    ).images
