"""Loss of one micro-batch: the latent-diffusion loss and the VAE (reconstruction + KL) loss.

Each is a callable `(batch, generator) -> (loss, logs)`; all randomness (caption
dropout, noise levels, noise, posterior samples) comes from `generator`, which the
loop seeds from (seed, step, rank), so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.captions import CaptionVariation
from training.data import drop_captions, latent_sample, posterior_sample
from training.dreambooth import prior_weights
from training.loss_options import latent_mask
from training.objectives import Objective
from training.sdxl import TextConditioning, added_conditioning


@dataclass
class DiffusionLoss:
    """VAE encode (or cached latents) -> scale -> noise -> target by prediction type -> (Min-SNR) MSE."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module | TextConditioning  # SD's CLIP encoder, or SDXL's (`training.sdxl`)
    vae: torch.nn.Module | None  # None when latents are cached
    objective: Objective
    input_ids: torch.Tensor  # token ids of every training caption, by dataset index (SDXL: (N, 2, L), or cache rows)
    empty_ids: torch.Tensor  # token ids of the empty caption
    caption_dropout: float
    scaling_factor: float
    variation: CaptionVariation | None = None  # per-step tag shuffle/dropout; None: the fixed input_ids
    num_instance: int | None = None  # DreamBooth: dataset indices >= this are class images (prior preservation)
    prior_loss_weight: float = 1.0

    def sample_weights(self, batch: dict, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """The objective's per-sample weights (Min-SNR, debiased), times the prior-preservation split."""
        weights = self.objective.loss_weights(alpha, sigma)
        if self.num_instance is None:
            return weights
        split = prior_weights(batch["index"] >= self.num_instance, self.prior_loss_weight)
        return split if weights is None else weights * split

    def caption_ids(self, batch: dict) -> torch.Tensor:
        if "input_ids" in batch:  # streamed data (WebDataset shards) carries its own tokens
            return batch["input_ids"]
        if self.variation is None or not self.variation.active:
            return self.input_ids[batch["index"]]
        return self.variation.ids(batch["index"], batch["position"])

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if "latent_mean" in batch:
            return latent_sample(batch, self.scaling_factor, generator)
        with torch.no_grad():
            dist = self.vae.encode(batch["pixel_values"].to(self.vae.device, self.vae.dtype)).latent_dist
            return self.scaling_factor * posterior_sample(dist.mean, dist.std, generator)

    def __call__(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        device = next(self.unet.parameters()).device
        x0 = self.latents(batch, generator).to(device, torch.float32)
        ids = drop_captions(self.caption_ids(batch), self.empty_ids, self.caption_dropout, generator)
        timesteps, alpha, sigma = self.objective.sample_levels(x0.shape[0], generator)
        noise = self.objective.sample_noise(x0, generator)
        x_t = self.objective.noisy_input(x0, noise, alpha, sigma, generator)
        target = self.objective.target(x0, noise, alpha, sigma)
        weights = self.sample_weights(batch, alpha, sigma)
        mask = latent_mask(batch["mask"], x0.shape).to(device) if "mask" in batch else None
        return self.loss(x_t, timesteps, self.condition(ids.to(device), batch), target, weights, mask), {}

    def condition(self, ids: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict | None]:
        """(encoder_hidden_states, added_cond_kwargs): SDXL adds pooled text and size time ids (`training.sdxl`)."""
        if isinstance(self.text_encoder, TextConditioning):
            hidden, pooled = self.text_encoder(ids)
            return hidden, added_conditioning(pooled, batch)
        return self.text_encoder(ids, return_dict=False)[0], None

    def loss(self, x_t, timesteps, condition, target, weights, mask=None) -> torch.Tensor:
        encoder_hidden_states, added = condition
        timesteps = timesteps.to(x_t.device, torch.float32 if self.objective.is_flow else torch.long)
        prediction = self.unet(x_t, timesteps, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        return self.objective.loss(prediction, target, weights, mask)

    @torch.no_grad()
    def fixed_loss(self, batch: dict, seed: int) -> float:
        """The validation loss: fixed noise levels (evenly spread), fixed noise, full captions."""
        generator = torch.Generator().manual_seed(seed)
        device = next(self.unet.parameters()).device
        x0 = self.latents(batch, generator).to(device, torch.float32)
        timesteps, alpha, sigma = self.objective.fixed_levels(x0.shape[0])
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        x_t = self.objective.diffuse(x0, noise, alpha, sigma)
        target = self.objective.target(x0, noise, alpha, sigma)
        condition = self.condition(self.input_ids[batch["index"]].to(device), batch)
        return float(self.loss(x_t, timesteps, condition, target, self.objective.loss_weights(alpha, sigma)))


class VaeReconstruction(torch.nn.Module):
    """AutoencoderKL encode -> sample -> decode as one forward, so DDP synchronises its gradients."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.mean + posterior.std * noise).sample
        rec = F.mse_loss(reconstruction.float(), pixels.float())
        kl = posterior.kl().mean() / pixels[0].numel()
        return rec, kl


@dataclass
class VaeLoss:
    """AutoencoderKL loss: pixel MSE + kl_weight * KL per pixel (Kingma & Welling 2014; LDM's KL-reg autoencoder)."""

    model: torch.nn.Module  # a (possibly DDP-wrapped) VaeReconstruction
    kl_weight: float
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent

    def terms(self, pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn((pixels.shape[0], *self.latent_shape), generator=generator)
        device = next(self.model.parameters()).device
        return self.model(pixels.to(device), noise.to(device))

    def __call__(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        rec, kl = self.terms(batch["pixel_values"], generator)
        return rec + self.kl_weight * kl, {"reconstruction": rec.item(), "kl": kl.item()}

    @torch.no_grad()
    def fixed_loss(self, batch: dict, seed: int) -> float:
        rec, kl = self.terms(batch["pixel_values"], torch.Generator().manual_seed(seed))
        return float(rec + self.kl_weight * kl)
