"""`LatentTextToImagePipeline`: the generation stages of `ldm_pipeline.pipeline` on diffusers' `DiffusionPipeline`.

diffusers gives it `from_pretrained` / `save_pretrained` / `from_single_file`, device moves and
offloading, and the LoRA and textual-inversion loaders. Importing it imports diffusers' pipelines,
models and loaders (and, through them, transformers, peft and the quantizers): most of a cold
start, which is why it lives apart from the stages (`from ldm_pipeline.pipeline import
LatentTextToImagePipeline` still works and imports this module then).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.adapters import pickle_free_kwargs
from ldm_pipeline.pipeline import LatentTextToImageStages

logger = logging.getLogger("ldm_pipeline.pipeline")

__all__ = ["LatentTextToImagePipeline"]


class LatentTextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin,
                                FromSingleFileMixin, LatentTextToImageStages):
    """Text-to-image, img2img and inpainting with a latent diffusion model (see module docstring).

    diffusers' loader mixins give it `load_lora_weights` (diffusers, kohya and A1111 files, as
    diffusers converts them), `set_adapters`, `fuse_lora` / `unfuse_lora`, `unload_lora_weights`
    and `load_textual_inversion` (see `ldm_pipeline.adapters` for the pickle guard).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    family = "sd"  # which model family this class runs (`loading.model_family`); SDXL: `sdxl`
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    STOCK_CLASS = "StableDiffusionPipeline"  # what saved folders call themselves: stock diffusers opens them

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, skipping a folder's safety checker, feature extractor and image encoder."""
        for name in cls._optional_components:
            kwargs.setdefault(name, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' `save_pretrained`, as a `StableDiffusionPipeline` folder (empty safety checker slots)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        index.write_text(json.dumps({**config, "_class_name": self.STOCK_CLASS}, indent=2, sort_keys=True) + "\n")

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        safety_checker: None = None,
        feature_extractor: None = None,
        image_encoder: None = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        dropped = [name for name, value in (("safety_checker", safety_checker), ("feature_extractor", feature_extractor),
                                            ("image_encoder", image_encoder)) if value is not None]
        if dropped:
            logger.warning("LatentTextToImagePipeline does not use %s; dropped.", ", ".join(dropped))
        # the stock SD slots, kept empty, so that folders and `from_pipe` line up with StableDiffusionPipeline
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              safety_checker=None, feature_extractor=None, image_encoder=None)
        self.register_to_config(requires_safety_checker=False)
        self._init_state()

    # ------------------------------------------------------------ loaders (pickle only when asked for)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, *, allow_pickle=False,
                          **kwargs):
        """diffusers' `load_lora_weights`; a `.pt`/`.bin`/`.ckpt` file needs `allow_pickle=True`."""
        kwargs = pickle_free_kwargs(pretrained_model_name_or_path_or_dict, kwargs, allow_pickle)
        return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               *, allow_pickle=False, **kwargs):
        """diffusers' `load_textual_inversion`; an A1111 `.pt` embedding needs `allow_pickle=True`."""
        kwargs = pickle_free_kwargs(pretrained_model_name_or_path, kwargs, allow_pickle)
        return super().load_textual_inversion(pretrained_model_name_or_path, token=token, tokenizer=tokenizer,
                                              text_encoder=text_encoder, **kwargs)
