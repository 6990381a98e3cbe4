"""The latent text-to-image pipeline: prompt -> embeddings -> denoising loop -> VAE decode.

`LatentTextToImagePipeline` is a `diffusers.DiffusionPipeline` with the Stable Diffusion
1.x/2.x components (`vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`), so any SD
folder loads into it with `from_pretrained`. Its stages live here in `LatentTextToImageStages`,
the class itself in `diffusers_pipeline` (imported on first use of the name). Public call::

    out = pipe("a red circle", negative_prompt="blurry", num_inference_steps=30,
               guidance_scale=7.5, guidance_schedule="constant", guidance_interval=(0.28, 5.42),
               guidance_rescale=0.0, guidance_method="cfg", pag_scale=0.0, width=512, height=512, seed=42,
               num_images_per_prompt=4,
               image=None, strength=None, mask_image=None, callback=None, progress_bar=True)
    out.images, out.seeds, out.unet_evaluations, out.recipes

Every keyword is a field of `GenerationOptions` (`ldm_pipeline.options`, documented there), which
checks them all before the model runs; steps and guidance left out are the model's recommended
settings (`pipe.recommended`, from its record.json), then SD's 30 / 7.5. Seeds: image j of
the call uses seed `seed + j` (or `seed[j]` for a list), drawn from its own generator,
so an image depends only on its seed, never on the batch it was made in.

Stock diffusers' call arguments work with `StableDiffusionPipeline`'s (img2img's, inpainting's) meaning:
`generator` (one or a list; over `seed`; see `noise_source` for recipes), `latents`, `eta`, `timesteps` /
`sigmas`, `callback_on_step_end` (`step_callbacks`), `return_dict=False` -> `(images, None)`,
`cross_attention_kwargs`, `guidance_rescale`, `clip_skip`, `ip_adapter_image(_embeds)` (after
`load_ip_adapter`); an argument that cannot apply (eta or a custom grid the sampler does not take,
IP-Adapter images without an adapter) is refused with the reason. As stock,
img2img and inpainting start from a sample of the VAE posterior drawn from each image's generator
before its noise, and 4-channel inpainting blends the known latents re-noised to the next level
after every step (`InpaintBlend`). tests/test_stock_call_parity.py holds the equalities.

Cancelling: `callback(info: StepInfo)` is called after every step; return True (or
raise) to stop. A True return raises `GenerationCancelled`.

Scheduler contract: `set_timesteps(n, device=)`, `timesteps`, `order`, `init_noise_sigma`,
`scale_model_input(x, t)`, `step(pred, t, x, return_dict=False)`, and `add_noise`
for img2img / inpainting. Stock diffusers schedulers and ours both fulfil it. Guidance methods
(`guidance_methods`) keep to it: CFG++ hands `step` the sample its renoising needs.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ldm_pipeline import hires, metadata
from ldm_pipeline.adapters import ip_adapter_record
from ldm_pipeline.guidance import Guidance, Guider, as_interval, recommended_guidance_rescale
from ldm_pipeline.guidance_methods import GuidanceMethod
from ldm_pipeline.noise_source import NoiseSource
from ldm_pipeline.options import GenerationOptions, InvalidOptions, ModelLimits, as_rgb, grid_list, label
from ldm_pipeline.perturbed_attention import PerturbedAttention, perturbed_attention
from ldm_pipeline.prompt_schedule import is_scheduled, prompt_schedules, text_at_step
from ldm_pipeline.prompts import PromptEmbeddings, as_prompt_list, encode_pair, pad_to_windows
from ldm_pipeline.step_callbacks import StepEndCallback

logger = logging.getLogger(__name__)

__all__ = ["GenerationCancelled", "GenerationOptions", "LatentPipelineOutput", "LatentTextToImageStages",
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


def _takes(method, name: str) -> bool:
    # Stock diffusers schedulers differ here (DDIM/Euler take a generator, PNDM/LMS do not; only some take eta or
    # custom grids), and stock pipelines ask the same way (`prepare_extra_step_kwargs`, `retrieve_timesteps`).
    return name in inspect.signature(method).parameters


NO_IP_ADAPTER = ("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter, and none is loaded: "
                 "pipe.load_ip_adapter(folder, subfolder=..., weight_name=...) first.")


class LatentTextToImageStages:
    """The generation stages of `LatentTextToImagePipeline` (see module docstring), on any object that holds
    the SD components (`vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`) and calls `_init_state()`.

    `LatentTextToImagePipeline` (`ldm_pipeline.diffusers_pipeline`) puts them on diffusers'
    `DiffusionPipeline`; the ONNX backend (`ldm_pipeline.onnx_backend`) on a plain class, so that a
    one-shot command imports neither diffusers' pipelines and models nor transformers' text models.
    Subclasses provide `_execution_device`, `maybe_convert_prompt(prompt, tokenizer)` and
    `active_lora_records()` (and, for IP-Adapters, `image_encoder` and `prepare_ip_adapter_image_embeds`).
    """

    def _init_state(self) -> None:
        """Image processors and per-model records, once the modules are registered (shared with SDXL)."""
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self._call_device: torch.device | None = None
        self._num_timesteps, self._interrupt = 0, False
        self.model_id: str | None = None  # set by `load_pipeline`; recorded in recipes
        # The model's recommended num_inference_steps / guidance_scale (`record.json` of the folder), if any.
        self.recommended: dict = {}
        self.model_hash: str | None = None
        # LoRAs made active by `ldm_pipeline.adapters.activate_loras` ({"name", "hash", "scale"}); in recipes
        self.lora_records: list[dict] = []
        self.embedding_records: list[dict] = []  # every loaded embedding ({"name", "hash"}); in recipes
        # LoRAs loaded and weighted directly (load_lora_weights / set_adapters): adapter -> {"name", "hash"} / weight
        self._lora_files: dict[str, dict] = {}
        self._lora_weights: dict[str, Any] = {}

    # ------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(self, prompt=None, **options) -> LatentPipelineOutput | tuple:
        opts = GenerationOptions.from_kwargs(prompt=prompt, **options).with_defaults(self.recommended)
        opts.check(self.limits())
        self._check_model_takes(opts)
        if opts.hires is not None:  # two passes, each a call of this pipeline (`hires`)
            return hires.generate(self, opts)
        self._call_device = self._execution_device  # walks every module (~10 ms): once per call
        # 1. Check inputs (done above), prompts and size
        prompts = opts.prompt_list()
        width, height = self._size(opts)
        count = len(prompts) * opts.num_images_per_prompt
        # 2. Noise source (seeds or generators), guidance, timesteps
        noise = NoiseSource.of(opts, count)
        guidance = self._guidance(opts)
        timesteps, steps = self._timesteps(opts)
        opts = replace(opts, num_inference_steps=steps)  # a custom grid's step count, for the recipe
        guider = Guider(guidance, self.scheduler, timesteps)  # per step: w and the UNet passes; the method's state
        # 3. Encode prompts (the unconditional ones only if some step runs that pass)
        per_step = self._step_embeddings(opts, prompts, guider.needs_uncond, count, len(timesteps))
        embeds = per_step[0]
        # 4. Initial latents: noise, or the init image noised to the first timestep
        latents, blend = self._initial_latents(opts, (count, width, height), timesteps, noise.generator,
                                               embeds.cond.dtype)
        # 5. Denoising loop
        step_end = StepEndCallback.of(opts)
        latents, evaluations = self._denoise(latents, timesteps, guider, per_step, blend, noise.generator, opts, step_end)
        check_finite(latents)
        # 6. Decode
        images = self._decode(latents, opts.output_type)
        recipes = self._recipes(opts, guidance, prompts, noise, (width, height), step_end)
        if not opts.return_dict:
            return images, None  # stock's (images, nsfw_content_detected): no safety checker here
        return LatentPipelineOutput(images=images, seeds=noise.seeds, unet_evaluations=evaluations, recipes=recipes)

    def _denoise(self, latents, timesteps, guider: Guider, per_step: list[PromptEmbeddings], blend, generator, opts,
                 step_end: StepEndCallback | None = None):
        """x_t -> x_0: scale_model_input, one batched UNet call for the step's passes, guidance, step.
        `per_step[i]` conditions step i (prompt editing) until a step-end callback replaces the embeddings."""
        embeds, scheduled = per_step[0], True
        step_kwargs = self._step_kwargs(generator, opts.eta)
        self._num_timesteps, self._interrupt = len(timesteps), False
        evaluations = 0
        with perturbed_attention(self.unet, guider.guidance.pag) as pag:
            for i, t in enumerate(tqdm(timesteps, **self._bar_config(opts))):
                embeds = per_step[i] if scheduled else embeds
                x_in = self.scheduler.scale_model_input(latents, t)
                preds = self._predict_passes(x_in, t, embeds, guider.passes[i], opts, pag)
                pred, sample = guider.guide(i, preds, t, x_in, latents)
                evaluations += len(guider.passes[i])
                latents = self.scheduler.step(pred, t, sample, return_dict=False, **step_kwargs)[0]
                if blend is not None:
                    latents = blend(self.scheduler, latents, timesteps[i + 1] if i + 1 < len(timesteps) else None)
                if step_end is not None:
                    latents, changed = step_end(self, i, t, latents, embeds)
                    scheduled, embeds = scheduled and changed is embeds, changed
                self._report_step(opts.callback, StepInfo(i + 1, len(timesteps), float(t), latents, guider.scales[i]))
                if self._interrupt:  # stock's way to stop from callback_on_step_end: the latents so far are decoded
                    break
        return latents, evaluations

    def _predict_passes(self, x_in, t, embeds: PromptEmbeddings, passes: tuple[str, ...], opts, pag) -> dict:
        """{pass: prediction} from one UNet call over the step's passes ([uncond; cond; perturbed], as stock)."""
        if not passes:
            return {}
        context, added = embeds.batched(passes)
        unet = self.unet
        if pag is not None:
            pag.select(with_uncond="uncond" in passes)
            unet = pag.unet
        out = self._predict(torch.cat([x_in] * len(passes)), t, context, opts.cross_attention_kwargs, added, unet)
        return dict(zip(passes, out.chunk(len(passes))))

    def _step_kwargs(self, generator, eta: float | None) -> dict:
        """The generator(s) for samplers that draw noise, and eta when given (`_check_model_takes`), as stock's
        `prepare_extra_step_kwargs` (stock passes its default eta=0.0, which is DDIM's own default)."""
        kwargs = {"generator": generator} if _takes(self.scheduler.step, "generator") else {}
        return {**kwargs, "eta": eta} if eta is not None else kwargs

    def _check_model_takes(self, opts: GenerationOptions) -> None:
        """Refuse eta / timesteps / sigmas / IP-Adapter images that this model and sampler cannot use."""
        name = type(self.scheduler).__name__
        if opts.eta is not None and not _takes(self.scheduler.step, "eta"):
            raise InvalidOptions(f"eta={opts.eta} cannot apply: {name}.step takes no eta (stock pipelines pass it only "
                                 "to samplers that take it, such as DDIM); leave eta out or use a DDIM scheduler.")
        for grid in ("timesteps", "sigmas"):
            if getattr(opts, grid) is not None and not _takes(self.scheduler.set_timesteps, grid):
                raise InvalidOptions(f"Custom {grid} cannot apply: {name}.set_timesteps does not take {grid}=; use a "
                                     "sampler that does (every ldm-toolkit sampler, or e.g. EulerDiscreteScheduler).")
        ip_given = opts.ip_adapter_image is not None or opts.ip_adapter_image_embeds is not None
        if ip_given != self._ip_adapted():
            raise InvalidOptions(NO_IP_ADAPTER if ip_given else "An IP-Adapter is loaded: give ip_adapter_image (or "
                                 "ip_adapter_image_embeds), or remove it with pipe.unload_ip_adapter().")
        if opts.ip_adapter_image is not None and self.image_encoder is None:
            raise InvalidOptions("ip_adapter_image needs the IP-Adapter's image encoder, and none is loaded: pass "
                                 "image_encoder_folder to load_ip_adapter, or give ip_adapter_image_embeds.")

    def _ip_adapted(self) -> bool:
        projection = getattr(self.unet, "encoder_hid_proj", None)
        if projection is None:  # no adapter: diffusers' models (a cold start's largest import) stay unloaded
            return False
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        return isinstance(projection, MultiIPAdapterImageProjection)

    def _with_ip_adapter(self, opts, embeds: PromptEmbeddings, count: int, with_uncond: bool) -> PromptEmbeddings:
        """The IP-Adapter image embeddings as added conditioning, computed as stock computes them."""
        if opts.ip_adapter_image is None and opts.ip_adapter_image_embeds is None:
            return embeds
        per_adapter = self.prepare_ip_adapter_image_embeds(opts.ip_adapter_image, opts.ip_adapter_image_embeds,
                                                           self._device, count, with_uncond)
        if not with_uncond:
            return embeds.with_added({"image_embeds": per_adapter}, None)
        uncond, cond = zip(*(e.chunk(2) for e in per_adapter))
        return embeds.with_added({"image_embeds": list(cond)}, {"image_embeds": list(uncond)})

    @property
    def num_timesteps(self) -> int:
        """The number of timesteps of the current (or last) call, as stock pipelines expose it to callbacks."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a `callback_on_step_end` to stop after that step, as in stock."""
        return self._interrupt

    def _bar_config(self, opts) -> dict:
        """tqdm settings: `set_progress_bar_config` (as in diffusers), off when the call says progress_bar=False."""
        config = {"desc": "denoising", **getattr(self, "_progress_bar_config", {})}
        return {**config, "disable": True} if not opts.progress_bar else config

    def _predict(self, x: torch.Tensor, t, context: torch.Tensor, cross_attention_kwargs=None,
                 added: dict | None = None, unet=None) -> torch.Tensor:
        extra = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}  # ONNX takes none
        if added is not None:
            extra["added_cond_kwargs"] = added  # SDXL's text_embeds / time_ids
        return (unet or self.unet)(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]

    @staticmethod
    def _report_step(callback, info: StepInfo) -> None:
        if callback is not None and callback(info) is True:
            raise GenerationCancelled(f"Generation cancelled after step {info.step} of {info.num_steps}.")

    def _recipes(self, opts, guidance: Guidance, prompts: list[str], noise: NoiseSource, size,
                 step_end: StepEndCallback | None) -> list[dict]:
        negatives = as_prompt_list(opts.negative_prompt, "negative_prompt") or [""]
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        n, count = opts.num_images_per_prompt, len(noise.seeds)
        strength = self._strength(opts) if opts.image is not None else None
        settings = opts.recipe_settings(size, strength, guidance.describe())
        settings["ip_adapter"] = ip_adapter_record(self.unet, opts.ip_adapter_image, opts.ip_adapter_image_embeds)
        if step_end is not None and (step_end.altered or step_end.interrupted_after):  # the recipe cannot replay it
            settings["altered_by"] = step_end.describe()
        return [
            metadata.make_recipe(self, {"prompt": prompts[j // n], "negative_prompt": negatives[j // n],
                                        **noise.recipe_fields(j, count), **settings})
            for j in range(count)
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
            h0, w0 = self.image_processor.get_default_height_width(opts.image)
            w0, h0 = w0 - w0 % m, h0 - h0 % m
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
            method=GuidanceMethod.of(opts.guidance_method, **opts.method_parameters()),
            pag=PerturbedAttention(float(opts.pag_scale), tuple(opts.pag_layer_list())) if opts.pag_scale else None,
        )

    def _timesteps(self, opts: GenerationOptions) -> tuple[torch.Tensor, int]:
        """The sampler's timesteps and step count; img2img/inpainting starts `strength` of the way from the clean end."""
        steps = self._set_timesteps(opts)
        strength = self._strength(opts)
        if strength >= 1.0:
            return self.scheduler.timesteps, steps
        run = min(int(steps * strength), steps)
        if run < 1:
            raise ValueError(f"strength {strength} with {steps} steps runs no step; raise either.")
        start = (steps - run) * self.scheduler.order
        # diffusers schedulers that index their sigmas need to know where sampling starts
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:], steps

    def _set_timesteps(self, opts: GenerationOptions) -> int:
        """`set_timesteps` with the step count or a custom grid; a grid's step count is the number of timesteps the
        sampler makes of it, as in stock's `retrieve_timesteps` (diffusers' Euler reads the last sigma as the end)."""
        grid = {name: grid_list(getattr(opts, name)) for name in ("timesteps", "sigmas") if getattr(opts, name) is not None}
        if not grid:
            self.scheduler.set_timesteps(opts.num_inference_steps, device=self._device)
            return opts.num_inference_steps
        self.scheduler.set_timesteps(device=self._device, **grid)
        steps = len(self.scheduler.timesteps)
        if opts.num_inference_steps not in (None, steps):
            raise InvalidOptions(f"{label('num_inference_steps')} is {opts.num_inference_steps} but the custom "
                                 f"{', '.join(grid)} make {steps} steps with {type(self.scheduler).__name__}; leave "
                                 "num_inference_steps out (the grid sets it).")
        return steps

    @staticmethod
    def _strength(opts: GenerationOptions) -> float:
        if opts.image is None:
            return 1.0
        if opts.strength is not None:
            return opts.strength
        return 1.0 if opts.mask_image is not None else 0.8

    def _step_embeddings(self, opts: GenerationOptions, prompts: list[str], with_uncond: bool, count: int,
                         run_steps: int) -> list[PromptEmbeddings]:
        """The embeddings of each of the run's steps, one per image: A1111's prompt editing schedules
        (`prompt_schedule`) over the call's steps, each distinct set of texts encoded once; steps are counted
        from the run's first step, as A1111's sampler does for img2img. A prompt without edits is encoded once."""
        negative = as_prompt_list(opts.negative_prompt, "negative_prompt") if opts.prompt_embeds is None else []
        steps = opts.prompt_edit_steps or opts.num_inference_steps
        schedules = prompt_schedules(prompts, steps), prompt_schedules(negative, steps)
        if not (is_scheduled(schedules[0], prompts) or is_scheduled(schedules[1], negative)):
            return [self._embeddings_per_image(opts, prompts, with_uncond, count)] * run_steps
        encoded, per_step = {}, []
        for i in range(run_steps):
            texts = tuple(tuple(text_at_step(s, i) for s in side) for side in schedules)
            if texts not in encoded:
                step_opts = replace(opts, prompt=list(texts[0]), negative_prompt=list(texts[1]) or None)
                encoded[texts] = self._embeddings_per_image(step_opts, list(texts[0]), with_uncond, count)
            per_step.append(encoded[texts])
        return per_step

    def _embeddings_per_image(self, opts, prompts: list[str], with_uncond: bool, count: int) -> PromptEmbeddings:
        embeds = self._embeddings(opts, prompts, with_uncond).repeat_each(opts.num_images_per_prompt)
        return self._with_ip_adapter(opts, embeds, count, with_uncond)

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

    def _initial_latents(self, opts, batch: tuple[int, int, int], timesteps, generator, dtype):
        """Stock's order: the init image's VAE sample, then the noise, from the same generator(s); noise alone
        for text-to-image and full-strength inpainting, else the init image noised to the first timestep."""
        count, width, height = batch
        f = self.vae_scale_factor
        known = None if opts.image is None else self._encode_image(opts.image, count, width, height, generator)
        noise = self._noise((count, self.unet.config.in_channels, height // f, width // f), generator, opts.latents,
                            dtype)
        if known is None or (opts.mask_image is not None and self._strength(opts) >= 1.0):
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(known.to(dtype), noise, timesteps[:1].repeat(count))
        if opts.mask_image is None:
            return latents, None
        # Stock draws a VAE sample of the masked image (for 9-channel inpainting UNets) from the generators here, one
        # per init image; drawing the same numbers keeps stochastic samplers' step noise equal to stock's. (Latents
        # given as the image have no masked image to encode: stock draws nothing then.)
        if not self._is_latent_image(opts.image):
            n = _image_count(opts.image)
            self._noise((n, *noise.shape[1:]), generator[:n] if isinstance(generator, list) else generator, None, dtype)
        mask = self._latent_mask(opts.mask_image, count, width, height).to(dtype)
        return latents, InpaintBlend(known.to(dtype), mask, noise)

    def _is_latent_image(self, image) -> bool:
        """A tensor [B, latent channels, h, w] given as `image`: latents, used as they are (as stock takes them,
        e.g. a base model's output_type="latent" for a refiner)."""
        first = _first(image)
        return (isinstance(first, torch.Tensor) and first.ndim == 4
                and first.shape[1] == self.vae.config.latent_channels != 3)

    def _noise(self, shape: tuple, generator, latents: torch.Tensor | None, dtype) -> torch.Tensor:
        """Standard normal initial noise: drawn from the generator(s), or the caller's `latents` (as stock)."""
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self._device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise InvalidOptions(f"latents have shape {tuple(latents.shape)}; this call needs {shape} (images, "
                                 f"latent channels, height / {self.vae_scale_factor}, width / {self.vae_scale_factor}).")
        return latents.to(self._device, dtype)

    def _encode_image(self, image, count: int, width: int, height: int, generator=None) -> torch.Tensor:
        """Init image(s) -> scaled latents, one per output image: a sample of the VAE posterior drawn from the
        generator(s) as stock img2img draws it (a list: image j from generator j), or its mean (generator None);
        latents given as the image are used as they are (`_is_latent_image`), as stock."""
        if self._is_latent_image(image):
            latents = torch.cat(image) if isinstance(image, (list, tuple)) else image
            return _broadcast(latents, count, "image").to(self._device)
        pixels = self.image_processor.preprocess(as_rgb(image), height=height, width=width)
        with self._vae_precision() as (dtype, stored):
            posterior = self.vae.encode(pixels.to(self._device, dtype)).latent_dist
            if generator is None:
                latents = posterior.mode()
            else:
                if isinstance(generator, list):  # stock repeats the image for each generator before sampling
                    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

                    posterior = DiagonalGaussianDistribution(_broadcast(posterior.parameters, count, "image"))
                latents = posterior.sample(generator)
        latents = latents.to(stored)
        shift = self.vae.config.shift_factor or 0.0
        return _broadcast((latents - shift) * self.vae.config.scaling_factor, count, "image")

    @contextmanager
    def _vae_precision(self):
        """(dtype the VAE runs one encode or decode in, dtype it is stored in): SDXL upcasts a half VAE (`sdxl`).
        Anything else decoding with this pipeline's VAE (previews) goes through it too."""
        yield self.vae.dtype, self.vae.dtype

    def _latent_mask(self, mask_image, count: int, width: int, height: int) -> torch.Tensor:
        mask = self.mask_processor.preprocess(mask_image, height=height, width=width)
        mask = F.interpolate(mask, size=(height // self.vae_scale_factor, width // self.vae_scale_factor))
        return _broadcast(mask, count, "mask_image").to(self._device)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        shift = self.vae.config.shift_factor or 0.0
        with self._vae_precision() as (dtype, _):
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


def _image_count(image) -> int:
    """How many init images `image` holds (a list, a 4-d batch, or one image), as `VaeImageProcessor` reads it."""
    if isinstance(image, (list, tuple)):
        return len(image)
    return image.shape[0] if getattr(image, "ndim", 3) == 4 else 1


def _broadcast(batch: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """One item for every output image: 1 -> count, or count // n each when n divides count."""
    n = batch.shape[0]
    if count % n:
        raise ValueError(f"Got {n} {name}s for {count} images; give one, or one per prompt.")
    return batch.repeat_interleave(count // n, dim=0)


def __getattr__(name: str):
    """`LatentTextToImagePipeline` lives in `diffusers_pipeline` (it imports diffusers' pipelines, models and
    loaders); importing it from here still works and imports them only then."""
    if name == "LatentTextToImagePipeline":
        from ldm_pipeline.diffusers_pipeline import LatentTextToImagePipeline

        return LatentTextToImagePipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
