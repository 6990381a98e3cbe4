"""`LatentTextToImagePipeline`: the generation stages of `ldm_pipeline.pipeline` on diffusers' `DiffusionPipeline`.

diffusers gives it `from_pretrained` / `save_pretrained` / `from_single_file`, device moves and
offloading, and the LoRA, textual-inversion and IP-Adapter loaders. Importing it imports diffusers'
pipelines, models and loaders (and, through them, transformers, peft and the quantizers): most of a
cold start, which is why it lives apart from the stages (`from ldm_pipeline.pipeline import
LatentTextToImagePipeline` still works and imports this module then).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline.adapters import file_hash, file_record, lora_hash, lora_layers_enabled, named_file, pickle_free_kwargs
from ldm_pipeline.pipeline import LatentTextToImageStages

logger = logging.getLogger("ldm_pipeline.pipeline")

__all__ = ["LatentTextToImagePipeline"]


class LatentTextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin,
                                IPAdapterMixin, FromSingleFileMixin, LatentTextToImageStages):
    """Text-to-image, img2img and inpainting with a latent diffusion model (see module docstring).

    diffusers' loader mixins give it `load_lora_weights` (diffusers, kohya and A1111 files, as
    diffusers converts them), `set_adapters`, `fuse_lora` / `unfuse_lora`, `unload_lora_weights`
    and `load_textual_inversion` (see `ldm_pipeline.adapters` for the pickle guard), and `load_ip_adapter` /
    `set_ip_adapter_scale` / `unload_ip_adapter` for `ip_adapter_image(_embeds)` (image embeddings as stock's).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    family = "sd"  # which model family this class runs (`loading.model_family`); SDXL: `sdxl`
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")  # skipped when a folder has them
    LORA_LOADER = StableDiffusionLoraLoaderMixin  # diffusers' loader of this family's LoRAs (SDXL: both encoders)
    STOCK_CLASS = "StableDiffusionPipeline"  # what saved folders call themselves: stock diffusers opens them

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, skipping a folder's safety checker, feature extractor and image encoder."""
        for name in cls.UNUSED_COMPONENTS:
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
        before = self._adapter_names()
        result = self.LORA_LOADER.load_lora_weights(self, pretrained_model_name_or_path_or_dict,
                                                    adapter_name=adapter_name, **kwargs)
        path = named_file(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"),
                          "pytorch_lora_weights.safetensors")
        for name in self._adapter_names() - before:
            self._lora_files[name] = file_record(path, path.stem if path else name, lora_hash)
        return result

    def set_adapters(self, adapter_names, adapter_weights=None):
        """diffusers' `set_adapters`; the weights are remembered for recipes."""
        super().set_adapters(adapter_names, adapter_weights)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        self._lora_weights = {name: 1.0 if w is None else w for name, w in zip(names, weights)}

    def unload_lora_weights(self, *args, **kwargs):
        super().unload_lora_weights(*args, **kwargs)
        self._lora_files, self._lora_weights, self.lora_records = {}, {}, []

    def delete_adapters(self, adapter_names):
        super().delete_adapters(adapter_names)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self._lora_files.pop(name, None)

    def _adapter_names(self) -> set[str]:
        return {name for names in self.get_list_adapters().values() for name in names}

    def active_lora_records(self) -> list[dict]:
        """The LoRAs the next image uses ({"name", "hash", "scale"}), for its recipe: those `adapters.activate_loras`
        set, else the active adapters loaded by `load_lora_weights` with their `set_adapters` weights."""
        if self.lora_records or not self._lora_files or not lora_layers_enabled(self.unet):
            return self.lora_records
        return [{**self._lora_files.get(name, {"name": name, "hash": None}), "scale": self._lora_weights.get(name, 1.0)}
                for name in self.get_active_adapters()]

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               *, allow_pickle=False, **kwargs):
        """diffusers' `load_textual_inversion`; an A1111 `.pt` embedding needs `allow_pickle=True`."""
        kwargs = pickle_free_kwargs(pretrained_model_name_or_path, kwargs, allow_pickle)
        result = super().load_textual_inversion(pretrained_model_name_or_path, token=token, tokenizer=tokenizer,
                                                text_encoder=text_encoder, **kwargs)
        sources, tokens = (pretrained_model_name_or_path, token) if isinstance(pretrained_model_name_or_path, list) \
            else ([pretrained_model_name_or_path], [token])
        for source, name in zip(sources, tokens or [None] * len(sources)):
            path = named_file(source, kwargs.get("weight_name"), "learned_embeds.safetensors")
            self.embedding_records.append(file_record(path, name or (path.stem if path else "embedding"), file_hash))
        return result

    # stock's image encoding for IP-Adapters (CLIP image embeds, zeros for the unconditional pass), reused
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
