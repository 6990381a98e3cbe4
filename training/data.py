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
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from training import shapes
from training.captions import caption_of, folder_repeats

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
    repeats: int = 1  # times the image is seen per epoch (kohya's `N_name` folders)
    mask_path: Path | None = None  # grayscale loss mask (white = learn), for the masked loss
    loader: Callable[[], Image.Image] | None = None  # decodes the image on demand (e.g. a `datasets` row)

    def load(self) -> Image.Image:
        if self.loader is not None:
            return self.loader()
        return self.image if self.image is not None else Image.open(self.path).convert("RGB")

    def size(self) -> tuple[int, int]:
        """(width, height), read from the file header only when the image is a file."""
        if self.path is None:
            return self.load().size
        with Image.open(self.path) as image:
            return image.size


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
    return {p: caption_of(p, root) for p in images}


def folder_sources(train_data_dir: str, image_column: str = "file_name", caption_column: str = "text"):
    """(sources, skipped): every readable image of an ImageFolder-style directory with its caption.

    Captions: metadata.jsonl, else a .txt/.caption file beside each image, else a kohya `N_name` folder's name;
    images in `N_name` folders are repeated N times per epoch (`training.captions`).
    """
    root = Path(train_data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--train_data_dir {root} does not exist or is not a folder. Point it at a folder of images "
            "with a metadata.jsonl or .txt captions, or use --dataset shapes."
        )
    captions = sorted(_folder_captions(root, image_column, caption_column).items())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        readable = list(pool.map(_readable, [p for p, _ in captions]))
    sources = [ImageSource(c, p, repeats=folder_repeats(p, root)) for (p, c), ok in zip(captions, readable) if ok]
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


class Item(NamedTuple):
    """One training image, transformed, with what SDXL's size conditioning needs (Podell et al. 2023, Sec. 2.2)."""

    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    index: int  # dataset index
    position: int  # stream position (seeds the crop, flip and caption processing)
    original_size: tuple[int, int]  # (height, width) of the image file
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    mask: torch.Tensor | None = None  # (1, H, W) in [0, 1], cropped like the pixels (masked loss)


@dataclass(frozen=True)
class ImageTransform:
    """Resize to cover the target size (default: the square resolution), crop, optionally flip; to CHW in [-1, 1]."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(image, rng)[0]

    def apply(self, image: Image.Image, rng: np.random.Generator, size: tuple[int, int] | None = None,
              mask: Image.Image | None = None):
        """(pixels, crop (top, left), mask or None) for a target (width, height); the mask gets the same geometry."""
        target_w, target_h = size or (self.resolution, self.resolution)
        width, height = image.size
        scale = max(target_w / width, target_h / height)
        resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale))) if scale != 1 else image.size
        if self.center_crop:
            left, top = (resized[0] - target_w) // 2, (resized[1] - target_h) // 2
        else:
            left, top = int(rng.integers(resized[0] - target_w + 1)), int(rng.integers(resized[1] - target_h + 1))
        box, flip = (left, top, left + target_w, top + target_h), self.random_flip and rng.random() < 0.5
        pixels = _resize_crop(image, resized, box, flip) / 127.5 - 1.0
        if mask is None:
            return pixels, (top, left), None
        return pixels, (top, left), _resize_crop(mask.convert("L").resize(image.size), resized, box, flip) / 255.0


def _resize_crop(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    """(C, H, W) float values 0..255 of `image` resized (bicubic), cropped to `box`, optionally mirrored."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(image.crop(box), dtype=np.float32)
    array = array[:, :, None] if array.ndim == 2 else array
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of `Item`s; item (index, position) uses an rng seeded by (seed, position).

    `sizes` gives each image's target (width, height) (its aspect-ratio bucket); default: the square resolution.
    """

    def __init__(self, sources: Sequence[ImageSource], transform: ImageTransform, seed: int,
                 sizes: Sequence[tuple[int, int]] | None = None):
        self.sources, self.transform, self.seed, self.sizes = list(sources), transform, seed, sizes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, position = key
        rng = np.random.default_rng((self.seed, position))
        source = self.sources[index]
        image = source.load()
        mask = Image.open(source.mask_path) if source.mask_path else None
        pixels, crop, mask = self.transform.apply(image, rng, self.sizes[index] if self.sizes else None, mask)
        return Item(pixels, index, position, (image.height, image.width), crop, mask)


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
    repeats: tuple[int, ...] | None = None  # times each sample appears per epoch (default: once)

    def positions(self, micro_step: int) -> range:
        start = (micro_step * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    @property
    def epoch_size(self) -> int:
        return sum(self.repeats) if self.repeats else self.num_samples

    def permutation(self, epoch: int) -> torch.Tensor:
        """Dataset indices of one epoch in their shuffled order (an index `repeats` times)."""
        perm = torch.randperm(self.epoch_size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return torch.from_numpy(np.repeat(np.arange(self.num_samples), self.repeats))[perm] if self.repeats else perm

    def keys(self, micro_step: int) -> list[tuple[int, int]]:
        """(dataset index, stream position) pairs for one micro-batch of this process."""
        keys, cached_epoch, perm = [], None, None
        for position in self.positions(micro_step):
            epoch = position // self.epoch_size
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            keys.append((int(perm[position % self.epoch_size]), position))
        return keys


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields the keys of micro-batches start, start+1, ... (endless) for a DataLoader."""

    def __init__(self, order, start_micro_step: int):  # a BatchOrder or buckets.BucketBatchOrder
        self.order, self.start = order, start_micro_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.order.keys(step)
            step += 1


SIZE_KEYS = ("original_size", "crop_top_left", "target_size")  # SDXL's micro-conditioning, (h, w) / (top, left)


def collate(items: list[Item]) -> dict:
    """A batch dict: pixel_values (B, 3, H, W); index, position and the `SIZE_KEYS` ((B, 2) each) per item."""
    batch = {"pixel_values": torch.stack([item.pixels for item in items])}
    for name in ("index", "position", "original_size", "crop_top_left"):
        batch[name] = torch.tensor([getattr(item, name) for item in items])
    batch["target_size"] = torch.tensor([tuple(item.pixels.shape[-2:]) for item in items])  # the trained crop
    if items[0].mask is not None:
        batch["mask"] = torch.stack([item.mask for item in items])
    return batch


def image_batches(dataset: ImageDataset, order, start_micro_step: int, num_workers: int) -> Iterator[dict]:
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
        keys = order.keys(step)
        index = torch.tensor([i for i, _ in keys])
        yield {**{k: v[index] for k, v in tensors.items()}, "index": index, "position": torch.tensor([p for _, p in keys])}
        step += 1


def recorded(batches: Iterator[dict], path: Path) -> Iterator[dict]:
    """The same batches; each one's (dataset index, stream position) pairs appended to `path` as it is consumed."""
    with open(path, "a") as log:
        for batch in batches:
            log.write(json.dumps({"index": batch["index"].tolist(), "position": batch["position"].tolist()}) + "\n")
            log.flush()
            yield batch


# ---------------------------------------------------------------- captions and latents


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length (as the SD pipeline encodes prompts): (B, L).

    SDXL's tokenizer pair `(tokenizer, tokenizer_2)` gives (B, 2, L), one row per text encoder.
    """
    if isinstance(tokenizer, tuple):
        return torch.stack([tokenize(t, captions) for t in tokenizer], dim=1)
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


def drop_captions(input_ids: torch.Tensor, empty_ids: torch.Tensor, probability: float, generator) -> torch.Tensor:
    """Replace each caption by the empty caption with `probability` (CFG training, Ho & Salimans 2022)."""
    if probability <= 0:
        return input_ids
    drop = torch.rand(input_ids.shape[0], generator=generator) < probability
    return torch.where(drop.view(-1, *[1] * (input_ids.ndim - 1)), empty_ids.to(input_ids)[None], input_ids)


@torch.no_grad()
def encode_latent_moments(vae, batches: Iterator[dict], device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{'latent_mean', 'latent_std'} of the VAE posterior (unscaled) and the `SIZE_KEYS` of every item."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        dist = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
        for name, value in (("latent_mean", dist.mean.float()), ("latent_std", dist.std.float()),
                            *((key, batch[key]) for key in SIZE_KEYS)):
            parts.setdefault(name, []).append(value.cpu())
    return {name: torch.cat(values).contiguous() for name, values in parts.items()}


def all_items(dataset: ImageDataset, batch_size: int, num_workers: int = 0) -> Iterator[dict]:
    """Every item of the dataset once, in order, as collated batches, deterministic (position = index)."""
    keys = [(i, i) for i in range(len(dataset))]
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers))


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I) drawn on the CPU: a sample of the VAE posterior (Kingma & Welling 2014)."""
    return mean + std * torch.randn(mean.shape, generator=generator).to(mean)


def latent_sample(batch: dict, scaling_factor: float, generator: torch.Generator) -> torch.Tensor:
    """x_0 = scaling_factor * posterior sample, from cached posterior moments."""
    return scaling_factor * posterior_sample(batch["latent_mean"], batch["latent_std"], generator)


def check_resolution(resolution: int, vae_factor: int) -> None:
    if resolution % vae_factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by the VAE's downsampling factor {vae_factor}; "
            f"use a multiple of {vae_factor} (e.g. {vae_factor * max(1, round(resolution / vae_factor))})."
        )


def cache_key(parts: dict) -> str:
    """A short stable hash of what determines a latent cache."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

