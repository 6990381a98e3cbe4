"""Aspect-ratio bucketing (NovelAI 2022, "NovelAI Improvements on Stable Diffusion"; kohya's sd-scripts).

Images of mixed shapes are trained at about the same area instead of being cropped
to one square. The bucket table holds (width, height) pairs with both sides
multiples of `step` within [min_side, max_side] and area <= resolution^2: each width
paired with the largest height that fits, plus the square (kohya's
`make_bucket_resolutions`). An image goes to the bucket whose aspect ratio is
nearest its own in log space (so 2:1 and 1:2 are treated alike), is resized to cover
the bucket and cropped to it.

Batch order: epoch e shuffles each bucket's items (an image appears `repeats` times)
with a generator seeded by (seed, e), cuts each bucket into batches of the
per-process batch size (a bucket's last batch may be smaller), and shuffles the
list of batches. The stream of batches is the concatenation of the epochs; process
r of W takes batches r, r+W, r+2W, ... So micro-step k of process r is a pure
function of (seed, k, rank): a resumed run reads exactly the batches an
uninterrupted one would, processes read disjoint items, and every item is read
once per epoch (times its repeats).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

Size = tuple[int, int]  # (width, height) in pixels


def bucket_table(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """Every bucket (width, height): sides multiples of `step` in [min_side, max_side], area <= resolution^2."""
    check_bucket_sides(resolution, step, min_side, max_side)
    max_area = resolution * resolution
    side = resolution // step * step
    sizes = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def check_bucket_sides(resolution: int, step: int, min_side: int, max_side: int) -> None:
    if step < 1 or min_side % step or max_side % step:
        raise ValueError(f"--min_bucket_reso {min_side} and --max_bucket_reso {max_side} must be multiples of "
                         f"--bucket_reso_steps {step}.")
    if not min_side <= resolution <= max_side:
        raise ValueError(f"--resolution {resolution} must lie within [--min_bucket_reso {min_side}, "
                         f"--max_bucket_reso {max_side}].")


def nearest_bucket(size: Size, table: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (log ratio distance; first on ties)."""
    width, height = size
    distances = [abs(math.log(w / h) - math.log(width / height)) for w, h in table]
    return int(np.argmin(distances))


def describe(table: Sequence[Size], buckets: Sequence[int], repeats: Sequence[int]) -> str:
    """The bucket table as printed at start-up: size, aspect ratio, images, items per epoch."""
    images = Counter(buckets)
    items = Counter()
    for bucket, times in zip(buckets, repeats):
        items[bucket] += times
    lines = ["bucket (w x h) | aspect | images | items/epoch"]
    for b in sorted(images):
        width, height = table[b]
        lines.append(f"{width} x {height} | {width / height:.2f} | {images[b]} | {items[b]}")
    return "\n".join(lines)


@dataclass
class BucketBatchOrder:
    """Micro-step -> (dataset index, stream position) pairs, each micro-batch from one bucket (see module doc)."""

    buckets: Sequence[int]  # bucket of each dataset index
    repeats: Sequence[int]  # times each dataset index appears per epoch
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    _epochs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.buckets) != len(self.repeats):
            raise ValueError("buckets and repeats must have one entry per image.")
        self.items_per_epoch = int(sum(self.repeats))
        self.batches_per_epoch = sum(math.ceil(len(m) / self.batch_size) for m in self.bucket_items().values())

    def bucket_items(self) -> dict[int, list[int]]:
        """Each bucket's dataset indices, an index repeated `repeats` times (sorted, before shuffling)."""
        members: dict[int, list[int]] = {}
        for index, (bucket, times) in enumerate(zip(self.buckets, self.repeats)):
            members.setdefault(bucket, []).extend([index] * times)
        return members

    def epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(batches, stream position of each batch's first item) of one epoch; the last two epochs are kept."""
        if epoch not in self._epochs:
            rng = np.random.default_rng((self.seed, epoch))
            batches = []
            for bucket, members in sorted(self.bucket_items().items()):
                shuffled = rng.permutation(np.asarray(members))
                batches += [shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
            starts = epoch * self.items_per_epoch + np.cumsum([0] + [len(b) for b in batches[:-1]])
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = (batches, starts)
        return self._epochs[epoch]

    def keys(self, micro_step: int) -> list[tuple[int, int]]:
        """(dataset index, stream position) pairs of this process's micro-batch `micro_step`."""
        epoch, slot = divmod(micro_step * self.world_size + self.rank, self.batches_per_epoch)
        batches, starts = self.epoch(epoch)
        return [(int(index), int(starts[slot]) + j) for j, index in enumerate(batches[slot])]


def assign_buckets(options, resolution: int, latent_factor: int, sizes: Sequence[Size]) -> tuple[list[Size], list[int]]:
    """(bucket table, bucket of each image) for `BucketOptions`; min/max sides default to resolution/2 and 2x."""
    step = options.bucket_reso_steps
    if step % latent_factor:
        raise ValueError(f"--bucket_reso_steps {step} must be a multiple of {latent_factor} (the VAE's and UNet's "
                         f"combined downsampling), e.g. {latent_factor * max(1, round(step / latent_factor))}.")
    min_side = options.min_bucket_reso or max(step, resolution // 2 // step * step)
    max_side = options.max_bucket_reso or resolution * 2 // step * step
    table = bucket_table(resolution, step, min_side, max_side)
    return table, [nearest_bucket(size, table) for size in sizes]


# ---------------------------------------------------------------- cached latents of bucketed images


@torch.no_grad()
def encode_per_image(vae, dataset, device, batch_size: int = 64, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """{'latent_mean.<i>', 'latent_std.<i>'}: posterior moments of every item (whose shapes differ by bucket),
    encoded in batches of one bucket size; item i is cropped with position i, as for square caches. Each
    item's `data.SIZE_KEYS` (SDXL's size conditioning) are kept as (N, 2) tensors by dataset index."""
    from training import data

    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(dataset.sizes):
        by_size.setdefault(tuple(size), []).append(index)
    batches = [[(i, i) for i in members[k : k + batch_size]] for members in by_size.values()
               for k in range(0, len(members), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data.collate,
                                         num_workers=num_workers)
    moments = {key: torch.zeros(len(dataset), 2, dtype=torch.long) for key in data.SIZE_KEYS}
    for batch in loader:
        dist = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
        for row, index in enumerate(batch["index"].tolist()):
            moments[f"latent_mean.{index}"] = dist.mean[row].float().cpu().contiguous()
            moments[f"latent_std.{index}"] = dist.std[row].float().cpu().contiguous()
            for key in data.SIZE_KEYS:
                moments[key][index] = batch[key][row]
    return moments


def per_image_batches(moments: dict[str, torch.Tensor], order, start_micro_step: int):
    """Endless micro-batches of cached per-image moments (one bucket each, so they stack) and their sizes."""
    from training.data import SIZE_KEYS

    step = start_micro_step
    while True:
        keys = order.keys(step)
        index = [i for i, _ in keys]
        yield {"latent_mean": torch.stack([moments[f"latent_mean.{i}"] for i in index]),
               "latent_std": torch.stack([moments[f"latent_std.{i}"] for i in index]),
               **{key: moments[key][index] for key in SIZE_KEYS},
               "index": torch.tensor(index), "position": torch.tensor([p for _, p in keys])}
        step += 1
