"""Loss options kohya users rely on: debiased estimation, multi-resolution noise, masked loss.

Debiased estimation (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training", eq. 11):
weight the epsilon error by 1/sqrt(SNR), with SNR capped at 1000 (kohya's
`apply_debiased_estimation`; at t = 0 the SNR is huge). For a network predicting y, the
epsilon error is e_y = d eps / d y times the y error (x_t fixed), so the y loss is weighted
by e_y^2 / sqrt(SNR):

    epsilon       e^2 = 1                       w = 1 / sqrt(s)
    sample        e^2 = SNR                     w = sqrt(s)
    v_prediction  e^2 = alpha^2 = SNR/(1+SNR)   w = sqrt(s) / (1 + s)
    flow          e^2 = alpha^2 = SNR/(1+sqrt(SNR))^2   w = sqrt(s) / (1 + sqrt(s))^2

(s = min(SNR, 1000)). kohya weights v-prediction by 1/(SNR+1) instead, which is not the
paper's weight translated to v; ours equals the paper's epsilon-space loss for every type.

Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion
Model Training"; kohya's `pyramid_noise_like`): white noise plus, for i = 0 .. iterations-1,
noise drawn at 1/r^i of the resolution (r uniform in [2, 4]), upsampled bilinearly and scaled by discount^i, then
renormalised to unit standard deviation: low frequencies get more energy, which lets the
model change an image's overall brightness and colour.

Masked loss (kohya's `apply_masked_loss`): each latent pixel's squared error is multiplied
by the training image's mask (1 = learn, 0 = ignore) area-downsampled to the latent size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from custom_schedulers import parameterization

DEBIASED_SNR_CAP = 1000.0  # kohya: at t = 0 the SNR is ~inf


def debiased_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of the y loss that make it (1/sqrt(SNR)) * |epsilon error|^2 (see module doc)."""
    parameterization.check_prediction_type(prediction_type)
    s = snr.to(torch.float64).clamp(max=DEBIASED_SNR_CAP)
    if prediction_type == "epsilon":
        return 1 / s.sqrt()
    if prediction_type == "sample":
        return s.sqrt()
    if prediction_type == "v_prediction":
        return s.sqrt() / (1 + s)
    return s.sqrt() / (1 + s.sqrt()) ** 2


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise from white `noise` (B, C, H, W); randomness from `generator` (on the CPU)."""
    batch, channels, height, width = noise.shape
    result = noise.clone()
    for i in range(iterations):  # i = 0 adds a second full-resolution noise, as kohya's and Whitaker's code do
        r = 2 + 2 * torch.rand((), generator=generator, dtype=torch.float64).item()
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        coarse = torch.randn((batch, channels, h, w), generator=generator, dtype=noise.dtype).to(noise.device)
        result = result + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return result / result.std()


def latent_mask(mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """(B, 1, H, W) pixel mask in [0, 1] -> (B, 1, h, w) at the latent size (area average)."""
    return F.interpolate(mask.float(), size=tuple(latent_shape[-2:]), mode="area")


def attach_masks(sources: list, mask_dir: str) -> list:
    """Each source with its mask: the image in `mask_dir` with the same file stem (any image extension)."""
    from dataclasses import replace

    from training.data import IMAGE_EXTENSIONS

    folder = Path(mask_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--conditioning_data_dir {folder} is not a folder of mask images.")
    masks = {p.stem: p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
    missing = [s.path.name for s in sources if s.path is None or s.path.stem not in masks]
    if missing:
        raise FileNotFoundError(f"--masked_loss: no mask in {folder} for {missing[:5]} ({len(missing)} images); "
                                "give every training image a same-named grayscale mask (white = learn).")
    return [replace(s, mask_path=masks[s.path.stem]) for s in sources]
