"""Validation (deterministic loss on a fixed held-out batch, image grids), latent caches, VAE scaling factor."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_pipeline.atomic import atomic_file
from training import data
from training.buckets import encode_per_image

logger = logging.getLogger(__name__)
VALIDATION_SEED = 1234  # fixed noise and posterior samples for the validation loss, in every run


# ---------------------------------------------------------------- latents


def latent_cache_path(vae, dataset: data.ImageDataset, config, name: str) -> Path:
    """output_dir/cache/latents-<name>-<hash of everything that determines the latents>.safetensors"""
    d = config.data
    key = data.cache_key({
        "format": 2,  # 2: with each item's size conditioning (data.SIZE_KEYS)
        "name": name, "n": len(dataset), "dataset": d.dataset, "dir": d.train_data_dir, "hf": config.finetune_data.hf_dataset, "res": d.resolution,
        "crop": d.center_crop, "seed": config.optimization.seed, "samples": d.num_train_samples,
        "colors": d.shapes_colors, "backgrounds": d.shapes_backgrounds, "buckets": dataset.sizes,
        "vae": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        "vae_weights": float(sum(p.double().sum() for p in vae.parameters())),
    })
    return Path(config.run.output_dir) / "cache" / f"latents-{name}-{key}.safetensors"


def latent_cache(accelerator, vae, dataset: data.ImageDataset, config, name: str) -> dict[str, torch.Tensor]:
    """Posterior moments of every item, computed once by the main process and stored as safetensors."""
    d, path = config.data, latent_cache_path(vae, dataset, config, name)
    if accelerator.is_main_process and not path.is_file():
        if d.random_flip:
            logger.warning("--cache_latents encodes each image once: random flips are fixed per image.")
        logger.info("Encoding %d images into %s ...", len(dataset), path)
        if dataset.sizes:  # bucketed: shapes differ, one tensor per image
            moments = encode_per_image(vae, dataset, accelerator.device, 64, d.dataloader_num_workers)
        else:
            moments = data.encode_latent_moments(vae, data.all_items(dataset, 64, d.dataloader_num_workers), accelerator.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(moments, str(tmp))
    accelerator.wait_for_everyone()
    return load_file(str(path))


@torch.no_grad()
def scaling_factor_of(vae, dataset: data.ImageDataset, max_samples: int = 2048) -> float:
    """1 / std of posterior samples (Rombach et al. 2022, Sec. 4.3 / App. G: unit-variance latents)."""
    subset = torch.utils.data.Subset(dataset, range(min(len(dataset), max_samples)))
    keys = [(i, i) for i in range(len(subset))]
    batches = [keys[i : i + 64] for i in range(0, len(keys), 64)]
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    samples = []
    for batch in batches:
        pixels = torch.stack([dataset[k][0] for k in batch]).to(vae.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        samples.append(data.posterior_sample(dist.mean, dist.std, generator).float().cpu())
    return float(1.0 / torch.cat(samples).std())


# ---------------------------------------------------------------- images


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_png_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


# ---------------------------------------------------------------- the validator


class Validator:
    """Runs on the main process: validation loss (current and EMA weights) and image grids."""

    def __init__(self, accelerator, config, components, scheduler_keys, ema, params, eval_loss, sources):
        self.accelerator, self.config, self.components = accelerator, config, components
        self.scheduler_keys, self.ema, self.params, self.eval_loss = scheduler_keys, ema, params, eval_loss
        self.dataset = data.ImageDataset(sources, data.ImageTransform(config.data.resolution, center_crop=True), 0)
        self._batch = None

    def batch(self) -> dict:
        """The fixed held-out batch (pixels, or cached posterior moments), built once."""
        if self._batch is None:
            index = torch.arange(len(self.dataset))
            if self.config.data.cache_latents and not self.config.model.train_vae:
                moments = latent_cache(self.accelerator, self.components.vae, self.dataset, self.config, "validation")
                self._batch = {**moments, "index": index}
            else:
                self._batch = data.collate([self.dataset[(i, i)] for i in range(len(self.dataset))])
        return self._batch

    def validate(self, step: int) -> dict:
        batch = self.batch() if self.config.data.cache_latents else None  # all ranks join the cache build
        metrics = {}
        if self.accelerator.is_main_process:
            c = self.components
            for module in (c.unet, c.text_encoder, c.text_encoder_2, c.vae):
                if module is not None:
                    module.eval()  # the loop puts the trained modules back in train mode
            batch = batch or self.batch()
            metrics["validation/loss"] = self.eval_loss.fixed_loss(batch, VALIDATION_SEED)
            if self.ema is not None:
                self.ema.store(self.params)
                self.ema.copy_to(self.params)
                metrics["validation/loss_ema"] = self.eval_loss.fixed_loss(batch, VALIDATION_SEED)
                self.images(step)
                self.ema.restore(self.params)
            else:
                self.images(step)
            logger.info("step %d: %s", step, {k: round(v, 5) for k, v in metrics.items()})
        self.accelerator.wait_for_everyone()
        return metrics

    def images(self, step: int) -> None:
        """Reconstructions (VAE training) or samples for --validation_prompts, saved as a PNG grid."""
        if self.config.model.train_vae:
            grid = self.reconstructions()
        elif self.config.run.validation_prompts:
            grid = self.samples()
        else:
            return
        path = Path(self.config.run.output_dir) / "validation" / f"step-{step:07d}.png"
        save_png_atomic(grid, path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")

    @torch.no_grad()
    def reconstructions(self) -> Image.Image:
        vae = self.components.vae
        pixels = self.batch()["pixel_values"][:8].to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        return image_grid(to_pil(pixels) + to_pil(reconstruction), columns=8)

    @torch.no_grad()
    def samples(self) -> Image.Image:
        from training.sampling import validation_images, validation_pipeline

        run = self.config.run
        pipe = validation_pipeline(self.components, self.scheduler_keys)
        images = validation_images(pipe, run.validation_prompts, run.validation_inference_steps,
                                   run.validation_guidance_scale, self.config.data.resolution, VALIDATION_SEED)
        return image_grid(images, columns=min(len(images), 8))
