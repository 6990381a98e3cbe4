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
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm_pipeline.options import GenerationOptions
from ldm_pipeline.pipeline import LatentTextToImagePipeline
from ldm_pipeline.prompt_weights import apply_emphasis, weighted_windows
from ldm_pipeline.prompts import PromptEmbeddings, as_prompt_list, frame_weights, frame_window

__all__ = ["LatentSDXLPipeline"]

logger = logging.getLogger(__name__)


class LatentSDXLPipeline(LatentTextToImagePipeline):
    """SDXL text-to-image, img2img and inpainting (see module docstring)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    family = "sdxl"
    _optional_components = ["feature_extractor", "image_encoder"]
    STOCK_CLASS = "StableDiffusionXLPipeline"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
                 scheduler: SchedulerMixin, image_encoder: None = None, feature_extractor: None = None,
                 force_zeros_for_empty_prompt: bool = True):
        DiffusionPipeline.__init__(self)  # stock SDXL's slots (the SD safety checker slots do not exist here)
        if image_encoder is not None or feature_extractor is not None:
            logger.warning("LatentSDXLPipeline does not use an image encoder (IP-Adapter); dropped.")
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=None,
                              feature_extractor=None)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._init_state()

    def _embeddings(self, opts: GenerationOptions, prompts: list[str], with_uncond: bool) -> PromptEmbeddings:
        if opts.prompt_embeds is not None:
            raise ValueError("prompt_embeds are not supported for SDXL models yet: pass the prompt as text.")
        width, height = self._size(opts)
        prompts_2 = _matching(as_prompt_list(opts.prompt_2, "prompt_2") or prompts, len(prompts), "prompt_2")
        negative = as_prompt_list(opts.negative_prompt, "negative_prompt")
        zero_uncond = not negative and opts.negative_prompt_2 is None and self.config.force_zeros_for_empty_prompt
        negative = _matching(negative or [""], len(prompts), "negative_prompt")
        negative_2 = _matching(as_prompt_list(opts.negative_prompt_2, "negative_prompt_2") or negative, len(prompts),
                               "negative_prompt_2")
        texts = [prompts, prompts_2] + ([negative, negative_2] if with_uncond and not zero_uncond else [])
        windows = max(len(weighted_windows(tok, p, opts.emphasis)) for tok, group in
                      zip([self.tokenizer, self.tokenizer_2] * 2, texts) for p in group)
        cond, pooled = self._encode(prompts, prompts_2, windows, opts)
        time_ids = self._time_ids(opts, (height, width), negative=False, count=len(prompts), dtype=cond.dtype)
        embeds = PromptEmbeddings(cond, None, {"text_embeds": pooled, "time_ids": time_ids})
        if with_uncond:
            uncond, uncond_pooled = ((torch.zeros_like(cond), torch.zeros_like(pooled)) if zero_uncond
                                     else self._encode(negative, negative_2, windows, opts))
            neg_ids = self._time_ids(opts, (height, width), negative=True, count=len(prompts), dtype=cond.dtype)
            embeds.uncond, embeds.uncond_added = uncond, {"text_embeds": uncond_pooled, "time_ids": neg_ids}
        return embeds

    @torch.no_grad()
    def _encode(self, prompts: list[str], prompts_2: list[str], windows: int, opts: GenerationOptions):
        """([B, 77 * windows, dim_1 + dim_2], pooled [B, projection_dim]) from both encoders."""
        hidden_1, _ = _encode_windows(self.text_encoder, self.tokenizer, prompts, windows, opts)
        hidden_2, pooled = _encode_windows(self.text_encoder_2, self.tokenizer_2, prompts_2, windows, opts)
        return torch.cat([hidden_1, hidden_2], dim=-1), pooled

    def _time_ids(self, opts, size: tuple[int, int], *, negative: bool, count: int, dtype) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop top-left, target size) as a [count, 6] tensor."""
        original, crop, target = opts.original_size or size, opts.crops_coords_top_left, opts.target_size or size
        if negative and opts.negative_original_size and opts.negative_target_size:  # else the positive ids (as stock)
            original, target = opts.negative_original_size, opts.negative_target_size
            crop = opts.negative_crops_coords_top_left or (0, 0)
        ids = list(original) + list(crop) + list(target)
        expected = self.unet.add_embedding.linear_1.in_features
        got = self.unet.config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
        if got != expected:
            raise ValueError(f"The UNet expects {expected} added-conditioning features but time ids and the pooled "
                             f"text embedding give {got}: text_encoder_2 does not fit this UNet.")
        return torch.tensor([ids] * count, dtype=dtype, device=self._device)


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
