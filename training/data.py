"""Training data: the built-in shapes pool and image folders, a step-indexed batch order, latents.

Every random choice is a pure function of (seed, position in the sample stream), so
the batch a process sees at optimizer step k is the same whether the run was
interrupted or not (resume = uninterrupted), and processes of a distributed run
read disjoint slices of each global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from training import shapes

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SHAPES_VALIDATION_SEED = 987_654_321  # one fixed validation stream: validation losses compare across runs and seeds


# ---------------------------------------------------------------- sources


@dataclass
class ImageSource:
    """Where a sample's image comes from: a file path or an in-memory image."""

    caption: str
    path: Path | None = None
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        return self.image if self.image is not None else Image.open(self.path).convert("RGB")


def shapes_sources(
    seed: int, count: int, colors: Sequence[str] | None = None, backgrounds: Sequence[str] | None = None
) -> list[ImageSource]:
    """`count` training samples: the train split with paraphrased captions (colours optionally restricted)."""
    samples = shapes.generate(seed, count, "train", paraphrases=True, colors=colors, backgrounds=backgrounds)
    return [ImageSource(s.caption, image=s.image) for s in samples]


def shapes_validation_sources(count: int) -> list[ImageSource]:
    """The held-out validation batch: a fixed stream of the train split with canonical captions (same for every run)."""
    samples = shapes.generate(SHAPES_VALIDATION_SEED, count, "train", paraphrases=False)
    return [ImageSource(s.caption, image=s.image) for s in samples]


def shapes_vocabulary() -> list[str]:
    """Every word a shapes caption (canonical or paraphrased) can contain."""
    words = "a on at in the background".split()
    for names in (shapes.SHAPES, shapes.COLORS, shapes.SIZES, shapes.POSITIONS):
        words += [w for name in names for w in name.split()]
    return list(dict.fromkeys(words))


def caption_vocabulary(captions: Sequence[str]) -> list[str]:
    """The distinct lower-case words of some captions (for a from-scratch tokenizer)."""
    return list(dict.fromkeys(w for c in captions for w in re.findall(r"[a-z0-9]+", c.lower())))


def _readable(path: Path) -> bool:
    """Decodes the whole image (`verify` misses a truncated JPEG, which then fails mid-training)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception as error:  # PIL raises many types for a bad file
        logger.warning("Skipping unreadable image %s: %s", path, error)
        return False


def _metadata_record(metadata: Path, number: int, line: str, image_column: str, caption_column: str) -> tuple[str, str]:
    """(file name, caption) of one metadata.jsonl line; a ValueError naming the file and line otherwise."""
    where = f"{metadata} line {number}"
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"{where} is not valid JSON ({error}); each line must be an object like "
                         f'{{"{image_column}": "a.png", "{caption_column}": "a caption"}}.') from None
    if not isinstance(record, dict) or image_column not in record or caption_column not in record:
        raise ValueError(f"{where} lacks '{image_column}' or '{caption_column}'; set "
                         "--image_column/--caption_column to the keys your file uses.")
    name = record[image_column]
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{where}: '{image_column}' must be a file name inside the folder, got {name!r}.")
    return name, str(record[caption_column])


def _folder_captions(root: Path, image_column: str, caption_column: str) -> dict[Path, str]:
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        try:
            lines = metadata.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{metadata} is not UTF-8 text ({error}).") from None
        records = [_metadata_record(metadata, number, line, image_column, caption_column)
                   for number, line in enumerate(lines, 1) if line.strip()]
        return {root / name: caption for name, caption in records}
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return {p: _caption_file(p.with_suffix(".txt")) for p in images}


def _caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    except UnicodeDecodeError as error:
        raise ValueError(f"Caption file {path} is not UTF-8 text ({error}).") from None


def folder_sources(train_data_dir: str, image_column: str = "file_name", caption_column: str = "text"):
    """(sources, skipped): every readable image of an ImageFolder-style directory with its caption."""
    root = Path(train_data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--train_data_dir {root} does not exist or is not a folder. Point it at a folder of images "
            "with a metadata.jsonl or .txt captions, or use --dataset shapes."
        )
    captions = sorted(_folder_captions(root, image_column, caption_column).items())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        readable = list(pool.map(_readable, [p for p, _ in captions]))
    sources = [ImageSource(caption=c, path=p) for (p, c), ok in zip(captions, readable) if ok]
    skipped = len(captions) - len(sources)
    if not sources:
        raise ValueError(f"--train_data_dir {root} has no readable images ({skipped} skipped); "
                         f"supported: {sorted(IMAGE_EXTENSIONS)}.")
    if skipped:
        logger.warning("%d of %d images in %s could not be opened and were skipped.", skipped, len(captions), root)
    return sources, skipped


# ---------------------------------------------------------------- images -> tensors


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) float pixels in [-1, 1] from same-size RGB images (the inverse of `validation.to_pil`)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy()) / 127.5 - 1.0


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, crop to a square, optionally flip; to a CHW float tensor in [-1, 1]."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        width, height = image.size
        scale = self.resolution / min(width, height)
        if scale != 1:
            size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = int(rng.integers(width - self.resolution + 1)), int(rng.integers(height - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32)
        if self.random_flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(array.transpose(2, 0, 1).copy()) / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of (pixel tensor, index); item (index, position) uses an rng seeded by both."""

    def __init__(self, sources: Sequence[ImageSource], transform: ImageTransform, seed: int):
        self.sources, self.transform, self.seed = list(sources), transform, seed

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, position = key
        rng = np.random.default_rng((self.seed, position))
        return self.transform(self.sources[index].load(), rng), index


# ---------------------------------------------------------------- batch order


@dataclass(frozen=True)
class BatchOrder:
    """Sample positions -> dataset indices: a fresh seeded permutation every epoch.

    Global micro-batch m holds stream positions [m*B*W, (m+1)*B*W); process r takes
    the r-th slice of B (B = per-process batch, W = processes).
    """

    num_samples: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def positions(self, micro_step: int) -> range:
        start = (micro_step * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def keys(self, micro_step: int) -> list[tuple[int, int]]:
        """(dataset index, stream position) pairs for one micro-batch of this process."""
        keys, cached_epoch, perm = [], None, None
        for position in self.positions(micro_step):
            epoch = position // self.num_samples
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            keys.append((int(perm[position % self.num_samples]), position))
        return keys


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields the keys of micro-batches start, start+1, ... (endless) for a DataLoader."""

    def __init__(self, order: BatchOrder, start_micro_step: int):
        self.order, self.start = order, start_micro_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.order.keys(step)
            step += 1


def collate(items: list[tuple[torch.Tensor, int]]) -> dict:
    return {"pixel_values": torch.stack([p for p, _ in items]), "index": torch.tensor([i for _, i in items])}


def image_batches(dataset: ImageDataset, order: BatchOrder, start_micro_step: int, num_workers: int) -> Iterator[dict]:
    """Endless micro-batches of pixels starting at `start_micro_step`."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicroBatchSampler(order, start_micro_step), collate_fn=collate,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )
    return iter(loader)


def tensor_batches(tensors: dict[str, torch.Tensor], order: BatchOrder, start_micro_step: int) -> Iterator[dict]:
    """Endless micro-batches gathered from in-memory tensors (cached latents)."""
    step = start_micro_step
    while True:
        index = torch.tensor([i for i, _ in order.keys(step)])
        yield {**{k: v[index] for k, v in tensors.items()}, "index": index}
        step += 1


# ---------------------------------------------------------------- captions and latents


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length (as the SD pipeline encodes prompts)."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


def drop_captions(input_ids: torch.Tensor, empty_ids: torch.Tensor, probability: float, generator) -> torch.Tensor:
    """Replace each caption by the empty caption with `probability` (CFG training, Ho & Salimans 2022)."""
    if probability <= 0:
        return input_ids
    drop = torch.rand(input_ids.shape[0], generator=generator) < probability
    return torch.where(drop[:, None], empty_ids.to(input_ids)[None], input_ids)


@torch.no_grad()
def encode_latent_moments(vae, pixels: Iterator[torch.Tensor], device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{'latent_mean', 'latent_std'} of the VAE posterior for every batch (unscaled)."""
    means, stds = [], []
    for batch in pixels:
        dist = vae.encode(batch.to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu().contiguous())
        stds.append(dist.std.float().cpu().contiguous())
    return {"latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous()}


def all_pixels(dataset: ImageDataset, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Every item of the dataset once, in order, deterministic (position = index)."""
    keys = [(i, i) for i in range(len(dataset))]
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    return (batch["pixel_values"] for batch in loader)


def latent_sample(batch: dict, scaling_factor: float, generator: torch.Generator) -> torch.Tensor:
    """x_0 = scaling_factor * (mean + std * N(0, I)) from cached posterior moments."""
    mean, std = batch["latent_mean"], batch["latent_std"]
    return scaling_factor * (mean + std * torch.randn(mean.shape, generator=generator))


def check_resolution(resolution: int, vae_factor: int) -> None:
    if resolution % vae_factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by the VAE's downsampling factor {vae_factor}; "
            f"use a multiple of {vae_factor} (e.g. {vae_factor * max(1, round(resolution / vae_factor))})."
        )


def cache_key(parts: dict) -> str:
    """A short stable hash of what determines a latent cache."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

