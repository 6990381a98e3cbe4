"""The latent text-to-image pipeline: prompt -> embeddings -> denoising loop -> VAE decode.

`LatentTextToImagePipeline` is a `diffusers.DiffusionPipeline` with the Stable Diffusion
1.x/2.x components (`vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`), so any SD
folder loads into it with `from_pretrained`. Public call::

    out = pipe("a red circle", negative_prompt="blurry", num_inference_steps=30,
               guidance_scale=7.5, guidance_schedule="constant", guidance_interval=(0.28, 5.42),
               guidance_rescale=0.0, width=512, height=512, seed=42, num_images_per_prompt=4,
               image=None, strength=None, mask_image=None, callback=None, progress_bar=True)
    out.images, out.seeds, out.unet_evaluations, out.recipes

Every keyword is a field of `GenerationOptions` (`ldm_pipeline.options`, documented there), which
checks them all before the model runs; steps and guidance left out are the model's recommended
settings (`pipe.recommended`, from its record.json), then SD's 30 / 7.5. Seeds: image j of
the call uses seed `seed + j` (or `seed[j]` for a list), drawn from its own generator,
so an image depends only on its seed, never on the batch it was made in.

Cancelling: `callback(info: StepInfo)` is called after every step; return True (or
raise) to stop. A True return raises `GenerationCancelled`.

Scheduler contract: `set_timesteps(n, device=)`, `timesteps`, `order`, `init_noise_sigma`,
`scale_model_input(x, t)`, `step(pred, t, x, return_dict=False)`, and `add_noise`
for img2img / inpainting. Stock diffusers schedulers and ours both fulfil it.
"""

from __future__ import annotations

import inspect
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_pipeline import metadata
from ldm_pipeline.adapters import pickle_free_kwargs
from ldm_pipeline.guidance import Guidance, GuidancePlan, as_interval, recommended_guidance_rescale
from ldm_pipeline.options import GenerationOptions, ModelLimits, as_rgb, image_seeds
from ldm_pipeline.prompts import PromptEmbeddings, as_prompt_list, encode_pair, pad_to_windows

logger = logging.getLogger(__name__)

__all__ = ["GenerationCancelled", "GenerationOptions", "LatentPipelineOutput", "LatentTextToImagePipeline",
           "NonFiniteLatents", "StepInfo"]


class GenerationCancelled(RuntimeError):
    """Raised when the step callback asks to stop."""


class NonFiniteLatents(FloatingPointError):
    """The denoising loop produced NaN or infinite latents; nothing is decoded or returned."""


@dataclass
class StepInfo:
    """What the per-step callback receives."""

    step: int  # 1-based index of the step just finished
    num_steps: int
    timestep: float
    latents: torch.Tensor
    guidance_scale: float  # w used at this step (1.0 = unconditional pass skipped)


@dataclass
class LatentPipelineOutput(BaseOutput):
    images: Any  # list of PIL images, np.ndarray [N, H, W, 3] in [0, 1], or latents
    seeds: list[int]
    unet_evaluations: int  # per image: 2 for a guided step, 1 for an unguided one
    recipes: list[dict]  # one JSON-ready recipe per image (see `metadata`)


@dataclass
class InpaintBlend:
    """Keeps the unmasked region: after each step it is replaced by the known latents re-noised
    to the new level (RePaint-style blending, Lugmayr et al. 2022; diffusers' 4-channel inpainting
    pipelines blend the same way)."""

    known: torch.Tensor  # clean latents of the init image
    mask: torch.Tensor  # [B, 1, h, w], 1 = repaint
    noise: torch.Tensor

    def __call__(self, scheduler, latents: torch.Tensor, next_timestep) -> torch.Tensor:
        known = self.known
        if next_timestep is not None:
            t = next_timestep.reshape(1).expand(latents.shape[0])
            known = scheduler.add_noise(self.known, self.noise, t)
        return self.mask * latents + (1 - self.mask) * known


def _step_takes_generator(scheduler) -> bool:
    # Stock diffusers schedulers differ here (DDIM/Euler take one, PNDM/LMS do not);
    # passing the per-image generators keeps stochastic samplers reproducible per seed.
    return "generator" in inspect.signature(scheduler.step).parameters


class LatentTextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin,
                                FromSingleFileMixin):
    """Text-to-image, img2img and inpainting with a latent diffusion model (see module docstring).

    diffusers' loader mixins give it `load_lora_weights` (diffusers, kohya and A1111 files, as
    diffusers converts them), `set_adapters`, `fuse_lora` / `unfuse_lora`, `unload_lora_weights`
    and `load_textual_inversion` (see `ldm_pipeline.adapters` for the pickle guard).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    family = "sd"  # which model family this class runs (`loading.model_family`); SDXL: `sdxl`
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")  # skipped when a folder has them
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

    def _init_state(self) -> None:
        """Image processors and per-model records, once the modules are registered (shared with SDXL)."""
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self._call_device: torch.device | None = None
        self.model_id: str | None = None  # set by `load_pipeline`; recorded in recipes
        # The model's recommended num_inference_steps / guidance_scale (`record.json` of the folder), if any.
        self.recommended: dict = {}
        self.model_hash: str | None = None
        # LoRAs and embeddings applied through `ldm_pipeline.adapters` ({"name", "hash", "scale"}); in recipes
        self.lora_records: list[dict] = []
        self.embedding_records: list[dict] = []

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

    # ------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(self, prompt=None, **options) -> LatentPipelineOutput:
        opts = GenerationOptions.from_kwargs(prompt=prompt, **options).with_defaults(self.recommended)
        opts.check(self.limits())
        self._call_device = self._execution_device  # walks every module (~10 ms): once per call
        # 1. Check inputs (done above), prompts and size
        prompts = opts.prompt_list()
        width, height = self._size(opts)
        count = len(prompts) * opts.num_images_per_prompt
        # 2. Seeds, guidance, timesteps
        seeds = image_seeds(opts.seed, count)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        guidance = self._guidance(opts)
        timesteps = self._timesteps(opts)
        scales = GuidancePlan(guidance, self.scheduler).scales(timesteps)  # w per step, 1.0 = no uncond pass
        # 3. Encode prompts (the unconditional ones only if some step is guided)
        with_uncond = any(GuidancePlan.needs_uncond(w) for w in scales)
        embeds = self._embeddings(opts, prompts, with_uncond).repeat_each(opts.num_images_per_prompt)
        # 4. Initial latents: noise, or the init image noised to the first timestep
        latents, blend = self._initial_latents(opts, (count, width, height), timesteps, generators, embeds.cond.dtype)
        # 5. Denoising loop
        latents, evaluations = self._denoise(latents, timesteps, scales, embeds, guidance, blend, generators, opts)
        check_finite(latents)
        # 6. Decode
        images = self._decode(latents, opts.output_type)
        recipes = self._recipes(opts, guidance, prompts, seeds, (width, height))
        return LatentPipelineOutput(images=images, seeds=seeds, unet_evaluations=evaluations, recipes=recipes)

    def _denoise(self, latents, timesteps, scales, embeds: PromptEmbeddings, guidance: Guidance, blend, generators,
                 opts):
        """x_t -> x_0: scale_model_input, one batched UNet call for (uncond, cond), guidance, step."""
        step_kwargs = {"generator": generators} if _step_takes_generator(self.scheduler) else {}
        evaluations = 0
        for i, (t, w) in enumerate(tqdm(list(zip(timesteps, scales)), **self._bar_config(opts))):
            x_in = self.scheduler.scale_model_input(latents, t)
            guided = GuidancePlan.needs_uncond(w)
            if guided:
                pair = self._predict(torch.cat([x_in, x_in]), t, embeds.pair(), opts.cross_attention_kwargs,
                                     embeds.added_pair())
                pred = guidance.combine(*pair.chunk(2), w)
            else:
                pred = self._predict(x_in, t, embeds.cond, opts.cross_attention_kwargs, embeds.cond_added)
            evaluations += 2 if guided else 1
            latents = self.scheduler.step(pred, t, latents, return_dict=False, **step_kwargs)[0]
            if blend is not None:
                latents = blend(self.scheduler, latents, timesteps[i + 1] if i + 1 < len(timesteps) else None)
            self._report_step(opts.callback, StepInfo(i + 1, len(timesteps), float(t), latents, w))
        return latents, evaluations

    def _bar_config(self, opts) -> dict:
        """tqdm settings: `set_progress_bar_config` (as in diffusers), off when the call says progress_bar=False."""
        config = {"desc": "denoising", **getattr(self, "_progress_bar_config", {})}
        return {**config, "disable": True} if not opts.progress_bar else config

    def _predict(self, x: torch.Tensor, t, context: torch.Tensor, cross_attention_kwargs=None,
                 added: dict | None = None) -> torch.Tensor:
        extra = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}  # ONNX takes none
        if added is not None:
            extra["added_cond_kwargs"] = added  # SDXL's text_embeds / time_ids
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]

    @staticmethod
    def _report_step(callback, info: StepInfo) -> None:
        if callback is not None and callback(info) is True:
            raise GenerationCancelled(f"Generation cancelled after step {info.step} of {info.num_steps}.")

    def _recipes(self, opts, guidance: Guidance, prompts: list[str], seeds: list[int], size) -> list[dict]:
        negatives = as_prompt_list(opts.negative_prompt, "negative_prompt") or [""]
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        n = opts.num_images_per_prompt
        strength = self._strength(opts) if opts.image is not None else None
        settings = opts.recipe_settings(size, strength, guidance.describe())
        return [
            metadata.make_recipe(self, {"prompt": prompts[j // n], "negative_prompt": negatives[j // n],
                                        "seed": seed, **settings})
            for j, seed in enumerate(seeds)
        ]

    # ------------------------------------------------------------ stages

    @property
    def _device(self) -> torch.device:
        return self._call_device or self._execution_device

    def limits(self) -> ModelLimits:
        """What this model can do: the size multiple, the most steps, the CLIP depth (see `options`)."""
        return ModelLimits.of(self)

    def _size(self, opts: GenerationOptions) -> tuple[int, int]:
        """The checked width and height, else the init image's (rounded down to the size multiple), else native."""
        default = self.unet.config.sample_size * self.vae_scale_factor
        width, height = opts.width, opts.height
        if self._is_latent_image(opts.image) and (width is None or height is None):
            h0, w0 = (side * self.vae_scale_factor for side in _first(opts.image).shape[-2:])
            return width or w0, height or h0
        if opts.image is not None and (width is None or height is None):
            m = self.limits().size_multiple
            w0, h0 = (side - side % m for side in self.image_processor.get_default_height_width(opts.image)[::-1])
            width, height = width or w0, height or h0
            GenerationOptions(prompt="-", width=width, height=height).check(self.limits())  # the image's own size
        return width or default, height or default

    def _guidance(self, opts: GenerationOptions) -> Guidance:
        rescale = opts.guidance_rescale
        if rescale is None:
            rescale = recommended_guidance_rescale(self.scheduler.config)
        return Guidance(
            scale=float(opts.guidance_scale), schedule=opts.guidance_schedule, min_scale=float(opts.guidance_min_scale),
            interval=as_interval(opts.guidance_interval), rescale=float(rescale),
            num_train_timesteps=self.scheduler.config.num_train_timesteps,
        )

    def _timesteps(self, opts: GenerationOptions) -> torch.Tensor:
        """The sampler's timesteps; img2img/inpainting starts `strength` of the way from the clean end."""
        steps = opts.num_inference_steps
        self.scheduler.set_timesteps(steps, device=self._device)
        strength = self._strength(opts)
        if strength >= 1.0:
            return self.scheduler.timesteps
        run = min(int(steps * strength), steps)
        if run < 1:
            raise ValueError(f"strength {strength} with {steps} steps runs no step; raise either.")
        start = (steps - run) * self.scheduler.order
        # diffusers schedulers that index their sigmas need to know where sampling starts
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    @staticmethod
    def _strength(opts: GenerationOptions) -> float:
        if opts.image is None:
            return 1.0
        if opts.strength is not None:
            return opts.strength
        return 1.0 if opts.mask_image is not None else 0.8

    def _embeddings(self, opts: GenerationOptions, prompts: list[str], with_uncond: bool) -> PromptEmbeddings:
        if opts.prompt_embeds is None:
            negative = as_prompt_list(opts.negative_prompt, "negative_prompt")
            # multi-vector textual-inversion tokens expand to their vectors' tokens, as stock does
            prompts, negative = (self.maybe_convert_prompt(p, self.tokenizer) if p else p for p in (prompts, negative))
            with self._text_encoder_lora_scale(opts.cross_attention_kwargs):
                return encode_pair(self.text_encoder, self.tokenizer, prompts, negative, with_uncond=with_uncond,
                                   clip_skip=opts.clip_skip, emphasis=opts.emphasis)
        cond = opts.prompt_embeds.to(self._device, self.text_encoder.dtype)
        uncond = opts.negative_prompt_embeds
        if uncond is None and with_uncond:
            empty = encode_pair(self.text_encoder, self.tokenizer, [""], None, with_uncond=False,
                                clip_skip=opts.clip_skip).cond
            uncond = pad_to_windows(empty.expand(cond.shape[0], -1, -1), empty, cond.shape[1])
        if uncond is not None and uncond.shape != cond.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(uncond.shape)} must match prompt_embeds {tuple(cond.shape)}.")
        return PromptEmbeddings(cond, None if uncond is None else uncond.to(cond))

    @contextmanager
    def _text_encoder_lora_scale(self, cross_attention_kwargs):
        """The LoRA `scale` on the text encoder while prompts are encoded (the UNet takes it per call), as stock."""
        scale = (cross_attention_kwargs or {}).get("scale")
        if scale is None:  # scale_lora_layers touches only LoRA layers: a model without any is unchanged
            yield
            return
        for encoder in self._text_encoders():
            scale_lora_layers(encoder, scale)
        try:
            yield
        finally:
            for encoder in self._text_encoders():
                unscale_lora_layers(encoder, scale)

    def _text_encoders(self) -> list:
        """The text encoders a prompt goes through (SDXL: both)."""
        return [self.text_encoder]

    def _initial_latents(self, opts, batch: tuple[int, int, int], timesteps, generators, dtype):
        count, width, height = batch
        f = self.vae_scale_factor
        shape = (count, self.unet.config.in_channels, height // f, width // f)
        noise = randn_tensor(shape, generator=generators, device=self._device, dtype=dtype)
        if opts.image is None:
            return noise * self.scheduler.init_noise_sigma, None
        known = self._encode_image(opts.image, count, width, height).to(dtype)
        if self._strength(opts) >= 1.0:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(known, noise, timesteps[:1].repeat(count))
        if opts.mask_image is None:
            return latents, None
        return latents, InpaintBlend(known, self._latent_mask(opts.mask_image, count, width, height).to(dtype), noise)

    def _is_latent_image(self, image) -> bool:
        """A tensor [B, latent channels, h, w] given as `image`: latents, used as they are (as stock takes them,
        e.g. a base model's output_type="latent" for a refiner)."""
        first = _first(image)
        return (isinstance(first, torch.Tensor) and first.ndim == 4
                and first.shape[1] == self.vae.config.latent_channels != 3)

    def _encode_image(self, image, count: int, width: int, height: int) -> torch.Tensor:
        """Init image(s) -> scaled latents, one per output image (the posterior mean: deterministic)."""
        if self._is_latent_image(image):
            latents = torch.cat(image) if isinstance(image, (list, tuple)) else image
            return _broadcast(latents, count, "image").to(self._device)
        pixels = self.image_processor.preprocess(as_rgb(image), height=height, width=width)
        pixels = _broadcast(pixels, count, "image").to(self._device)
        stored = self.vae.dtype
        with self._vae_precision() as dtype:
            latents = self.vae.encode(pixels.to(dtype)).latent_dist.mode().to(stored)
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @contextmanager
    def _vae_precision(self):
        """The dtype the VAE runs in for one encode or decode (SDXL upcasts a half VAE, see `sdxl`)."""
        yield self.vae.dtype

    def _latent_mask(self, mask_image, count: int, width: int, height: int) -> torch.Tensor:
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
        mask = F.interpolate(mask, size=(height // self.vae_scale_factor, width // self.vae_scale_factor))
        return _broadcast(mask, count, "mask_image").to(self._device)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        shift = self.vae.config.shift_factor or 0.0
        with self._vae_precision() as dtype:
            image = self.vae.decode(latents.to(dtype) / self.vae.config.scaling_factor + shift, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])


def check_finite(latents: torch.Tensor) -> None:
    """Refuse NaN/inf latents before anything is decoded or written (a diverging sampler or guidance)."""
    if not torch.isfinite(latents).all():
        raise NonFiniteLatents(
            "The sampler produced NaN or infinite latents, so no image was made: lower the guidance scale, "
            "use another sampler, or run in fp32."
        )


def _first(image):
    return image[0] if isinstance(image, (list, tuple)) and image else image


def _broadcast(batch: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """One item for every output image: 1 -> count, or count // n each when n divides count."""
    n = batch.shape[0]
    if count % n:
        raise ValueError(f"Got {n} {name}s for {count} images; give one, or one per prompt.")
    return batch.repeat_interleave(count // n, dim=0)
