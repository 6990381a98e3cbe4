"""Stages 1b and 1c of the shapes recipe: sharpen the VAE decoder with the encoder frozen.

    python training/recipes/shapes/finetune_decoder.py VAE_DIR OUT_DIR [--steps 1500] [--batch 16] [--lr 5e-4]
        [--small-fraction 0.5] [--edge-weight 4]

The training script's `--train_vae` trains encoder and decoder together; once the UNet trains on
the encoder's latents the encoder must not move. Fine-tuning only the decoder (and
post_quant_conv) keeps the latent space, so it can run while (or after) the UNet trains. The
loss is L1 + MSE on pixels (L1 sharpens the flat-colour edges). Two options aim it at what the
decoder gets wrong, the outlines of small shapes: `--small-fraction` of each batch are small shapes
(half, without it), and `--edge-weight` multiplies the loss on pixels within one pixel of an edge.
Each save is atomic.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ldm_pipeline.atomic import atomic_directory  # noqa: E402
from training import shapes  # noqa: E402
from training.data import to_pixels  # noqa: E402


def batches(seed: int, batch_size: int, small_fraction: float | None):
    """Endless batches of training-split images in [-1, 1]; `small_fraction` of them small shapes (None: uniform)."""
    if small_fraction is None:
        stream = (sample.image for sample in shapes.iter_samples(seed, "train"))
    else:
        stream = _sized_images(seed, small_fraction)
    while True:
        yield to_pixels([next(stream) for _ in range(batch_size)])


def _sized_images(seed: int, small_fraction: float):
    pools = {size: [a for a in shapes.combinations("train") if a.size == size] for size in shapes.SIZES}
    rng = np.random.default_rng(seed)
    while True:
        pool = pools["small" if rng.random() < small_fraction else "large"]
        yield shapes.render(pool[int(rng.integers(len(pool)))], rng)[0]


def edge_mask(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 where a pixel's 3x3 neighbourhood holds more than one colour, else 0."""
    spread = F.max_pool2d(pixels, 3, 1, 1) + F.max_pool2d(-pixels, 3, 1, 1)
    return (spread.amax(1, keepdim=True) > 1e-3).float()


def reconstruction_loss(reconstruction: torch.Tensor, pixels: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Per-pixel L1 + MSE, edge pixels weighted `edge_weight` times (1: plain mean)."""
    error = (reconstruction - pixels).abs() + (reconstruction - pixels) ** 2
    weight = 1 + (edge_weight - 1) * edge_mask(pixels)
    return (error * weight).sum() / (weight.sum() * pixels.shape[1])


def save_atomic(vae: AutoencoderKL, out: Path) -> None:
    with atomic_directory(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)


def finetune(
    vae_dir: Path, out: Path, steps: int, batch_size: int, lr: float, seed: int, save_every: int,
    small_fraction: float | None = None, edge_weight: float = 1.0,
) -> None:
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s / steps, 1))))
    started = time.time()
    for step, pixels in enumerate(batches(seed, batch_size, small_fraction), start=1):
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            z = posterior.sample()
        reconstruction = vae.decode(z).sample
        loss = reconstruction_loss(reconstruction, pixels, edge_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} {time.time() - started:.0f}s", flush=True)
        if step % save_every == 0 or step == steps:
            save_atomic(vae, out)
        if step == steps:
            break


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--small-fraction", type=float, default=None,
                        help="Fraction of each batch that are small shapes (default: drawn uniformly, about half).")
    parser.add_argument("--edge-weight", type=float, default=1.0, help="Loss weight of pixels at an edge (1: none).")
    args = parser.parse_args(argv)
    if args.small_fraction is not None and not 0 <= args.small_fraction <= 1:
        parser.error(f"--small-fraction must be in [0, 1], got {args.small_fraction}.")
    if args.edge_weight < 1:
        parser.error(f"--edge-weight must be >= 1, got {args.edge_weight}.")
    finetune(args.vae_dir, args.out, args.steps, args.batch, args.lr, args.seed, args.save_every,
             args.small_fraction, args.edge_weight)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
