"""The SDXL family on the same denoising loop: two text encoders and `text_time` added conditioning.

`LatentSDXLPipeline` is `LatentTextToImagePipeline` with SDXL's components (`text_encoder_2`,
`tokenizer_2`); it shares the loop, guidance, samplers, img2img and inpainting, and differs only in
how it encodes the prompt and builds the UNet's added conditioning (Podell et al. 2023, SDXL, sec. 2.2):

* the prompt (`prompt`, `prompt_2` for encoder 2) goes through `CLIPTextModel` and
  `CLIPTextModelWithProjection`; their penultimate hidden states (no final layer norm) are
  concatenated along the feature axis; the pooled, projected embedding comes from encoder 2;
* `add_time_ids` = original size + crop top-left + target size (`negative_*` for the uncond pass);
* the UNet gets `added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}`.

Long prompts are split into 75-token windows for both encoders (as `prompts` does for SD and as
A1111 does for SDXL); the pooled embedding is the first window's. Without a negative prompt the
uncond embeddings are zeros when the model says `force_zeros_for_empty_prompt` (stock's default).

Refiners (stock `StableDiffusionXLImg2ImgPipeline` folders with `requires_aesthetics_score`) load
too: no first text encoder (encoder 2 reads `prompt`, as stock), and the aesthetic score in place of
the target size in `add_time_ids`. Base + refiner hand-off, as stock::

    latents = base(prompt, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, image=latents, denoising_start=0.8).images[0]
    # or, with the recipes the base would write plus `refiner` (ldm-generate --refiner):
    out = Refiner(refiner, switch_at=0.8)(base, GenerationOptions(prompt=prompt))

With an init image the `add_time_ids` follow stock img2img / inpainting (each negative size defaults
to the positive one; the negative ids take the positive crop), else stock txt2img.

Loaders: `load_lora_weights` is diffusers' SDXL one (UNet and both text encoders);
`load_textual_inversion` of an SDXL embedding (A1111 format: `clip_l` and `clip_g` vectors) loads
each vector into its encoder under the same token. A half-precision VAE whose config says
`force_upcast` (the original SDXL VAE overflows in float16) encodes and decodes in float32, as stock;
the fp16-fix VAE (`force_upcast: false`) stays in half.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm_pipeline.adapters import file_hash, file_record, named_file, pickle_free_kwargs
from ldm_pipeline.diffusers_pipeline import LatentTextToImagePipeline
from ldm_pipeline.options import SDXL_OPTIONS, SDXL_SIZES, GenerationOptions
from ldm_pipeline.pipeline import InpaintBlend, LatentPipelineOutput
from ldm_pipeline.prompt_weights import apply_emphasis, weighted_windows
from ldm_pipeline.prompts import PromptEmbeddings, as_prompt_list, frame_weights, frame_window

__all__ = ["LatentSDXLPipeline", "Refiner"]

logger = logging.getLogger(__name__)

SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # A1111's SDXL embedding: one vector set per text encoder
_UPCAST_LOCK = threading.Lock()  # a shared half VAE is switched to float32 for one encode/decode at a time


class LatentSDXLPipeline(StableDiffusionXLLoraLoaderMixin, LatentTextToImagePipeline):
    """SDXL text-to-image, img2img and inpainting, base or refiner (see module docstring)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    family = "sdxl"
    _optional_components = ["tokenizer", "text_encoder", "feature_extractor", "image_encoder"]  # refiners: no encoder 1
    UNUSED_COMPONENTS = ("feature_extractor", "image_encoder")
    LORA_LOADER = StableDiffusionXLLoraLoaderMixin  # UNet, text encoders 1 and 2 ...
    load_lora_weights = LatentTextToImagePipeline.load_lora_weights  # ... through the base's pickle guard and records

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel | None,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer | None,
                 tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel, scheduler: SchedulerMixin,
                 image_encoder: None = None, feature_extractor: None = None,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False):
        DiffusionPipeline.__init__(self)  # stock SDXL's slots (the SD safety checker slots do not exist here)
        if image_encoder is not None or feature_extractor is not None:
            logger.warning("LatentSDXLPipeline does not use an image encoder (IP-Adapter); dropped.")
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=None,
                              feature_extractor=None)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                requires_aesthetics_score=requires_aesthetics_score)
        self._init_state()

    @property
    def STOCK_CLASS(self) -> str:  # noqa: N802 (the base class' constant)
        """What saved folders call themselves: a refiner is stock's img2img class, as its own folders say."""
        return "StableDiffusionXLImg2ImgPipeline" if self.config.requires_aesthetics_score else "StableDiffusionXLPipeline"

    # ------------------------------------------------------------ loaders

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               *, allow_pickle=False, **kwargs):
        """An A1111 SDXL embedding (`clip_l` + `clip_g`) into both encoders under one token, as the diffusers docs
        load one; anything else (or an explicit tokenizer / text_encoder) as diffusers' loader takes it."""
        state = _sdxl_embedding(pretrained_model_name_or_path, tokenizer or text_encoder,
                                pickle_free_kwargs(pretrained_model_name_or_path, kwargs, allow_pickle))
        if state is None:
            return super().load_textual_inversion(pretrained_model_name_or_path, token=token, tokenizer=tokenizer,
                                                  text_encoder=text_encoder, allow_pickle=allow_pickle, **kwargs)
        if not isinstance(token, str):
            raise ValueError("An SDXL embedding (clip_l + clip_g) needs token=<the word that calls it in prompts>.")
        before = len(self.embedding_records)
        if self.text_encoder is not None:
            super().load_textual_inversion(state["clip_l"], token=token, tokenizer=self.tokenizer,
                                           text_encoder=self.text_encoder, allow_pickle=allow_pickle)
        super().load_textual_inversion(state["clip_g"], token=token, tokenizer=self.tokenizer_2,
                                       text_encoder=self.text_encoder_2, allow_pickle=allow_pickle)
        path = named_file(pretrained_model_name_or_path, kwargs.get("weight_name"), "learned_embeds.safetensors")
        self.embedding_records[before:] = [file_record(path, token, file_hash)]  # one embedding, both vectors

    # ------------------------------------------------------------ prompts and added conditioning

    def _text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def _encoders(self) -> list[tuple]:
        """(text encoder, tokenizer) pairs; a refiner has only encoder 2 (which then reads `prompt`, as stock)."""
        pairs = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        return [(e, t) for e, t in pairs if e is not None]

    def _embeddings(self, opts: GenerationOptions, prompts: list[str], with_uncond: bool) -> PromptEmbeddings:
        width, height = self._size(opts)
        with self._text_encoder_lora_scale(opts.cross_attention_kwargs):
            if opts.prompt_embeds is not None:
                embeds = self._given_embeddings(opts, with_uncond)
            else:
                embeds = self._text_embeddings(opts, prompts, with_uncond)
        count, dtype = embeds.cond.shape[0], embeds.cond.dtype
        time_ids, negative_ids = self._time_ids(opts, (height, width))
        embeds.cond_added["time_ids"] = torch.tensor([time_ids] * count, dtype=dtype, device=self._device)
        if embeds.uncond_added is not None:
            embeds.uncond_added["time_ids"] = torch.tensor([negative_ids] * count, dtype=dtype, device=self._device)
        return embeds

    def _text_embeddings(self, opts: GenerationOptions, prompts: list[str], with_uncond: bool) -> PromptEmbeddings:
        prompts_2 = _matching(as_prompt_list(opts.prompt_2, "prompt_2") or prompts, len(prompts), "prompt_2")
        negative = as_prompt_list(opts.negative_prompt, "negative_prompt")
        zero_uncond = not negative and opts.negative_prompt_2 is None and self.config.force_zeros_for_empty_prompt
        negative = _matching(negative or [""], len(prompts), "negative_prompt")
        negative_2 = _matching(as_prompt_list(opts.negative_prompt_2, "negative_prompt_2") or negative, len(prompts),
                               "negative_prompt_2")
        cond_texts = self._converted([prompts, prompts_2])
        uncond_texts = self._converted([negative, negative_2]) if with_uncond and not zero_uncond else []
        windows = max(len(weighted_windows(tokenizer, p, opts.emphasis)) for texts in (cond_texts, uncond_texts)
                      for (_, tokenizer), group in zip(self._encoders(), texts) for p in group)
        cond, pooled = self._encode(cond_texts, windows, opts)
        embeds = PromptEmbeddings(cond, None, {"text_embeds": pooled})
        if with_uncond:
            uncond, uncond_pooled = ((torch.zeros_like(cond), torch.zeros_like(pooled)) if zero_uncond
                                     else self._encode(uncond_texts, windows, opts))
            embeds.uncond, embeds.uncond_added = uncond, {"text_embeds": uncond_pooled}
        return embeds

    def _converted(self, texts: list[list[str]]) -> list[list[str]]:
        """One prompt list per encoder (a refiner's only encoder reads the first), multi-vector textual-inversion
        tokens expanded to their vectors' tokens, as stock does."""
        return [self.maybe_convert_prompt(group, tokenizer) for (_, tokenizer), group in zip(self._encoders(), texts)]

    def _given_embeddings(self, opts: GenerationOptions, with_uncond: bool) -> PromptEmbeddings:
        """prompt_embeds + pooled_prompt_embeds as stock takes them; the uncond ones given, zeros, or encoded."""
        dtype = self.text_encoder_2.dtype
        cond = opts.prompt_embeds.to(self._device, dtype)
        embeds = PromptEmbeddings(cond, None, {"text_embeds": opts.pooled_prompt_embeds.to(self._device, dtype)})
        if not with_uncond:
            return embeds
        if opts.negative_prompt_embeds is not None:
            uncond = opts.negative_prompt_embeds.to(cond)
            uncond_pooled = opts.negative_pooled_prompt_embeds.to(cond)
        elif opts.negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(embeds.cond_added["text_embeds"])
        else:
            negative = _matching(as_prompt_list(opts.negative_prompt, "negative_prompt") or [""], cond.shape[0],
                                 "negative_prompt")
            negative_2 = _matching(as_prompt_list(opts.negative_prompt_2, "negative_prompt_2") or negative,
                                   cond.shape[0], "negative_prompt_2")
            uncond, uncond_pooled = self._encode(self._converted([negative, negative_2]), cond.shape[1] // 77, opts)
        if uncond.shape != cond.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(uncond.shape)} must match prompt_embeds "
                             f"{tuple(cond.shape)}.")
        embeds.uncond, embeds.uncond_added = uncond, {"text_embeds": uncond_pooled}
        return embeds

    @torch.no_grad()
    def _encode(self, texts: list[list[str]], windows: int, opts: GenerationOptions):
        """([B, 77 * windows, sum of hidden sizes], pooled [B, projection_dim]) from the encoders."""
        hidden, pooled = [], None
        for (encoder, tokenizer), prompts in zip(self._encoders(), texts):
            states, pooled = _encode_windows(encoder, tokenizer, prompts, windows, opts)
            hidden.append(states)
        return torch.cat(hidden, dim=-1), pooled

    def _time_ids(self, opts: GenerationOptions, size: tuple[int, int]) -> tuple[list, list]:
        """SDXL's micro-conditioning (stock `_get_add_time_ids`): original size, crop top-left, then the target
        size, or the aesthetic score for a refiner; (positive, negative) rows."""
        original, crop, target = opts.original_size or size, opts.crops_coords_top_left, opts.target_size or size
        positive = [*original, *crop, *target]
        negative_original = opts.negative_original_size or original
        if self.config.requires_aesthetics_score:
            positive = [*original, *crop, opts.aesthetic_score]
            negative = [*negative_original, *(opts.negative_crops_coords_top_left or (0, 0)),
                        opts.negative_aesthetic_score]
        elif opts.image is not None:  # stock img2img / inpainting
            negative = [*negative_original, *crop, *(opts.negative_target_size or target)]
        elif opts.negative_original_size and opts.negative_target_size:  # stock txt2img: both, else the positive
            negative = [*negative_original, *(opts.negative_crops_coords_top_left or (0, 0)),
                        *opts.negative_target_size]
        else:
            negative = positive
        self._check_added_features(len(positive))
        return [float(v) for v in positive], [float(v) for v in negative]

    def _check_added_features(self, time_ids: int) -> None:
        expected = self.unet.add_embedding.linear_1.in_features
        got = self.unet.config.addition_time_embed_dim * time_ids + self.text_encoder_2.config.projection_dim
        if got != expected:
            score = "needs" if got < expected else "does not take"
            raise ValueError(f"The UNet expects {expected} added-conditioning features but time ids and the pooled "
                             f"text embedding give {got}: the UNet {score} the aesthetic score (set "
                             "requires_aesthetics_score in model_index.json accordingly), or text_encoder_2 does not "
                             "fit this UNet.")

    def _recipes(self, opts, guidance, prompts: list[str], noise, size, step_end) -> list[dict]:
        """The base recipes plus `sdxl`: this image's SDXL options that differ from their defaults."""
        recipes = super()._recipes(opts, guidance, prompts, noise, size, step_end)
        n = opts.num_images_per_prompt
        for j, recipe in enumerate(recipes):
            settings = sdxl_settings(opts, j // n)
            if settings:
                recipe["sdxl"] = settings
        return recipes

    # ------------------------------------------------------------ base + refiner hand-off

    def _timesteps(self, opts: GenerationOptions) -> tuple[torch.Tensor, int]:
        """Stock SDXL's timesteps: strength (img2img), or from `denoising_start`; cut at `denoising_end`."""
        if opts.denoising_start is None:
            timesteps, steps = super()._timesteps(opts)
        else:
            steps = self._set_timesteps(opts)
            timesteps = self._timesteps_below(opts.denoising_start)
        if opts.denoising_end is not None:
            cutoff = self._discrete_cutoff(opts.denoising_end)
            timesteps = timesteps[:sum(1 for t in timesteps if t >= cutoff)]
        if len(timesteps) == 0:
            raise ValueError(f"denoising_start {opts.denoising_start} / denoising_end {opts.denoising_end} with "
                             f"{steps} steps run no step; raise the steps or move the switch.")
        return timesteps, steps

    def _discrete_cutoff(self, fraction: float) -> int:
        """The training timestep at a fraction of the schedule (stock: round(T - fraction * T))."""
        total = self.scheduler.config.num_train_timesteps
        return int(round(total - fraction * total))

    def _timesteps_below(self, denoising_start: float) -> torch.Tensor:
        """The scheduler's timesteps below the cutoff (a 2nd-order scheduler keeps whole steps), as stock."""
        timesteps = self.scheduler.timesteps
        run = int((timesteps < self._discrete_cutoff(denoising_start)).sum())
        if self.scheduler.order == 2 and run % 2 == 0:
            run += 1
        start = len(timesteps) - run
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps[start:]

    def _initial_latents(self, opts, batch: tuple[int, int, int], timesteps, generator, dtype):
        """With `denoising_start` the image is where the base stopped: no noise is added (stock add_noise=False)."""
        if opts.denoising_start is None:
            return super()._initial_latents(opts, batch, timesteps, generator, dtype)
        count, width, height = batch
        known = self._encode_image(opts.image, count, width, height, generator).to(dtype)
        if opts.mask_image is None:
            return known, None
        noise = randn_tensor(known.shape, generator=generator, device=self._device, dtype=dtype)
        return known, InpaintBlend(known, self._latent_mask(opts.mask_image, count, width, height).to(dtype), noise)

    # ------------------------------------------------------------ VAE precision

    @contextmanager
    def _vae_precision(self):
        """float32 for a float16 VAE whose config says `force_upcast` (stock SDXL), else the VAE's dtype. Such a
        VAE may be switched by another request sharing it: its dtype is read, and switched, under the lock only."""
        if not self.vae.config.force_upcast:
            yield self.vae.dtype, self.vae.dtype
            return
        with _UPCAST_LOCK:
            if self.vae.dtype != torch.float16:
                yield self.vae.dtype, self.vae.dtype
                return
            self.vae.to(dtype=torch.float32)
            try:
                yield torch.float32, torch.float16
            finally:
                self.vae.to(dtype=torch.float16)


@dataclass
class Refiner:
    """An SDXL refiner that takes over from the base model at `switch_at` of the schedule (A1111's "Refiner switch
    at"): the base runs to `denoising_end=switch_at` and hands its latents to the refiner (`denoising_start`), with
    the base's sampler. The recipes are the base's, with `refiner` (name, hash, switch_at) added."""

    pipe: LatentSDXLPipeline
    switch_at: float = 0.8

    def __post_init__(self):
        if getattr(self.pipe, "family", None) != "sdxl":
            raise ValueError(f"The refiner must be an SDXL model (base + refiner hand-off), got a "
                             f"{getattr(self.pipe, 'family', 'non-SDXL')} model.")
        if not (isinstance(self.switch_at, float) and 0.0 < self.switch_at < 1.0):
            raise ValueError(f"The refiner switch must be a fraction strictly between 0 and 1, got {self.switch_at!r}.")

    @classmethod
    def load(cls, folder, base, switch_at: float = 0.8, **load_options) -> "Refiner":
        """The refiner folder (`load_pipeline(folder, **load_options)`) for an SDXL `base`; ValueError names a
        mismatch (a non-SDXL base or refiner, a single file)."""
        from ldm_pipeline.loading import load_pipeline

        if getattr(base, "family", None) != "sdxl":
            raise ValueError(f"--refiner needs an SDXL base model; --model is a {base.family} model.")
        if Path(folder).is_file():
            raise ValueError(f"--refiner {folder}: give the refiner as a diffusers folder (a single file needs its "
                             "own config folder: load_pipeline(file, config=...).save_pretrained(folder) once).")
        return cls(load_pipeline(folder, **load_options), switch_at)

    def at(self, switch_at: float) -> "Refiner":
        """This refiner on its own pipeline copy (its networks shared) switching at `switch_at`: one per request of
        a server, since a hand-off sets the refiner's scheduler."""
        from ldm_pipeline.service import pipe_copy

        return Refiner(pipe_copy(self.pipe, self.pipe.scheduler), float(switch_at))

    def __call__(self, base, options: GenerationOptions) -> LatentPipelineOutput:
        if base.family != "sdxl" or options.denoising_end is not None or options.image is not None:
            raise ValueError("A refiner takes over text-to-image generation of an SDXL base model (no init image, no "
                             "denoising_end of your own).")
        self.pipe.scheduler = type(base.scheduler).from_config(base.scheduler.config)  # the same grid on both sides
        first = base(**replace(options, denoising_end=self.switch_at, output_type="latent").kwargs())
        final = self.pipe(**replace(options, image=first.images, denoising_start=self.switch_at,
                                    seed=first.seeds).kwargs())
        return LatentPipelineOutput(images=final.images, seeds=first.seeds,
                                    unet_evaluations=first.unet_evaluations + final.unet_evaluations,
                                    recipes=[self._recorded(recipe) for recipe in first.recipes])

    def describe(self) -> dict:
        return {"name": Path(self.pipe.model_id or "refiner").name, "hash": self.pipe.model_hash,
                "switch_at": self.switch_at}

    def _recorded(self, recipe: dict) -> dict:
        sdxl = {k: v for k, v in recipe.get("sdxl", {}).items() if k != "denoising_end"}
        recipe = {k: v for k, v in recipe.items() if k != "sdxl"}
        return {**recipe, **({"sdxl": sdxl} if sdxl else {}), "refiner": self.describe()}


def sdxl_settings(opts: GenerationOptions, prompt_index: int) -> dict:
    """The SDXL options of prompt `prompt_index` that differ from their defaults, JSON-ready (sizes as lists)."""
    settings = {}
    for name, default in SDXL_OPTIONS.items():
        value = getattr(opts, name)
        if name.endswith("prompt_embeds") or value is None or value == default:
            continue
        if name.endswith("prompt_2") and not isinstance(value, str):
            value = value[prompt_index] if len(value) > 1 else value[0]
        settings[name] = list(value) if name in SDXL_SIZES else value
    return settings


def _sdxl_embedding(source, explicit, kwargs: dict) -> dict | None:
    """The {clip_l, clip_g} state dict of an A1111 SDXL embedding file or dict, else None (a plain embedding)."""
    if explicit is not None or isinstance(source, (list, tuple, torch.Tensor)):
        return None
    state = load_textual_inversion_state_dicts([source], **kwargs)[0]
    return state if isinstance(state, dict) and all(k in state for k in SDXL_EMBEDDING_KEYS) else None


def _matching(prompts: list[str], count: int, name: str) -> list[str]:
    if len(prompts) == 1 and count > 1:
        return prompts * count
    if len(prompts) != count:
        raise ValueError(f"Got {len(prompts)} {name}s for {count} prompts; give one or one each.")
    return prompts


def _encode_windows(text_encoder, tokenizer, prompts: list[str], windows: int, opts: GenerationOptions):
    """One encoder: the chosen hidden layer of each 75-token window, concatenated; the first window's pooled output."""
    per_prompt = [weighted_windows(tokenizer, p, opts.emphasis) for p in prompts]
    padded = [w for ws in per_prompt for w in ws + [([], [])] * (windows - len(ws))]
    ids = torch.tensor([frame_window(tokenizer, w) for w, _ in padded], dtype=torch.long, device=text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-((opts.clip_skip or 0) + 2)]  # SDXL: penultimate layer, no final norm
    weights = torch.tensor([frame_weights(tokenizer, ws) for _, ws in padded], device=hidden.device)
    hidden = torch.stack([apply_emphasis(h, w, opts.emphasis) for h, w in zip(hidden, weights)])
    pooled = out[0].reshape(len(prompts), windows, -1)[:, 0] if out[0].ndim == 2 else None
    return hidden.reshape(len(prompts), windows * hidden.shape[1], hidden.shape[2]), pooled
