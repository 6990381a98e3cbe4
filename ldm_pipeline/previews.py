"""Live previews: a cheap latent -> RGB approximation fitted to the model's own VAE.

`LatentPreviewer.fit(pipe.vae)` decodes a few latents with the pipeline's VAE (PyTorch or the ONNX
backend's decoder: whatever `pipe.vae.decode` is), averages each decoded image over the VAE's
8x8 pixel blocks and fits, by least squares, an affine map from the latent channels to RGB:
rgb = latent @ A + b. This is A1111's "Approx cheap" and ComfyUI's latent2rgb (fixed
coefficients for SD 1.x there; fitted here, so any VAE works). A preview then costs one small
matrix product per step instead of a VAE decode. `VaePreviewer(pipe.vae)` is the exact alternative
(A1111's "Full"): one VAE decode per preview.

`preview_callback(previewer, every, on_preview)` wraps a step callback so that every `every`
steps `on_preview(step, total, images)` receives the current latents as PIL images.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FIT_LATENTS = 8  # latents decoded at start-up
FIT_SIDE = 16  # their side in latent pixels
PREVIEW_MODES = ("cheap", "full")  # the fitted map (LatentPreviewer) or a VAE decode (VaePreviewer)


@dataclass(frozen=True)
class LatentPreviewer:
    """An affine latent -> RGB map in [0, 1]: `weight` [C, 3], `bias` [3]."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, vae, device="cpu", seed: int = 0, precision: Callable | None = None) -> "LatentPreviewer":
        """Fitted to `vae.decode` (a diffusers AutoencoderKL or the ONNX backend's decoder); `precision`: see
        `decoded`."""
        latents = fit_latents(vae.config.latent_channels, seed)
        return cls.from_pairs(latents, decoded_blocks(vae, latents, device, precision))

    @classmethod
    def from_pairs(cls, latents: torch.Tensor, rgb: torch.Tensor) -> "LatentPreviewer":
        """Least squares over every latent pixel: [z, 1] @ [A; b] ~ rgb (normal equations via lstsq)."""
        design = torch.cat([pixels(latents), torch.ones(latents.numel() // latents.shape[1], 1)], dim=1)
        solution = torch.linalg.lstsq(design.double(), pixels(rgb).double()).solution.float()
        return cls(solution[:-1], solution[-1])

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latents -> [N, 3, h, w] approximate pixels in [0, 1] (one per latent pixel)."""
        z = latents.detach().float().cpu()
        out = torch.einsum("nchw,cd->ndhw", z, self.weight) + self.bias[None, :, None, None]
        return out.clamp(0, 1)

    def images(self, latents: torch.Tensor, scale: int = 8) -> list[Image.Image]:
        """PIL previews, enlarged `scale` times (nearest neighbour) to the output image's size."""
        pixels_ = (self.rgb(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(p)).resize((p.shape[1] * scale, p.shape[0] * scale),
                                                                 Image.NEAREST) for p in pixels_]


@dataclass(frozen=True)
class VaePreviewer:
    """Previews decoded by the VAE itself: exact, one decode per preview (A1111's "Full" live preview)."""

    vae: object
    device: object = "cpu"
    precision: Callable | None = None  # the pipeline's `_vae_precision` (see `decoded`)

    def images(self, latents: torch.Tensor, scale: int = 8) -> list[Image.Image]:
        """PIL images of the decoded latents (already at the output size; `scale` is not needed)."""
        pixels_ = (decoded(self.vae, latents, self.device, self.precision) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels_.numpy()]


def pixels(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N*h*w, C]."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()


def fit_latents(channels: int, seed: int, count: int = FIT_LATENTS, side: int = FIT_SIDE) -> torch.Tensor:
    """Unit-variance smooth latent fields (random 4x4 grids upsampled): colour regions like those of
    images, rather than white noise, which decodes to texture no 4 -> 3 map can follow."""
    coarse = torch.randn(count, channels, side // 4, side // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


@torch.no_grad()
def decoded(vae, latents: torch.Tensor, device="cpu", precision: Callable | None = None) -> torch.Tensor:
    """The VAE decode of `latents` (pipeline scale) as [N, 3, H, W] pixels in [0, 1], on the CPU. `precision`:
    the pipeline's `_vae_precision` (a VAE shared with running requests is decoded as they decode it: SDXL
    switches a half VAE to float32 under a lock); None = the VAE's own dtype."""
    dtype = getattr(vae, "dtype", torch.float32)
    shift = vae.config.shift_factor or 0.0
    with (precision or (lambda: nullcontext((dtype, dtype))))() as (run, _):
        z = (latents.detach() / vae.config.scaling_factor + shift).to(device, run)
        return (vae.decode(z, return_dict=False)[0].float().cpu() / 2 + 0.5).clamp(0, 1)


def decoded_blocks(vae, latents: torch.Tensor, device="cpu", precision: Callable | None = None) -> torch.Tensor:
    """The VAE decode of `latents` averaged over each latent pixel's block, in [0, 1]."""
    return F.adaptive_avg_pool2d(decoded(vae, latents, device, precision), latents.shape[-2:])


def preview_callback(previewer: LatentPreviewer, every: int | None, on_preview, callback=None, scale: int = 8):
    """A step callback calling `on_preview(step, total, images)` every `every` steps (never on the
    last: the real images follow), then `callback` (whose answer, True = stop, it returns)."""
    def step(info) -> bool:
        if every and on_preview is not None and info.step % every == 0 and info.step < info.num_steps:
            on_preview(info.step, info.num_steps, previewer.images(info.latents, scale))
        return callback(info) if callback is not None else False

    return step
