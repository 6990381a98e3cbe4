"""The pipeline used for validation images: the model being trained with the scheduler it will ship with."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from training.load_and_save import Components, output_scheduler


def validation_pipeline(components: Components, scheduler_keys: dict) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=output_scheduler(scheduler_keys), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
