"""WebDataset tar shards (`webdataset`) streamed for datasets that do not fit on disk or in memory.

A shard holds samples `<key>.png|jpg|webp` + `<key>.txt` (the WebDataset convention). The
stream is deterministic, so resume stays bit exact and processes stay disjoint:

* epoch e permutes the shard list with a generator seeded by (seed, e); process r of W reads
  shards r, r+W, ... of that order (so use at least W shards), each from start to end;
* a sample's stream position is (epoch, shard, index in shard) packed into one integer, which
  seeds its crop, flip and caption variation exactly as for image folders;
* micro-batches are consecutive samples, or with bucketing the first B samples of a bucket
  (a buffer per bucket, kohya's rule for streams); resuming replays the stream from the
  start, reading only image headers for the skipped batches.
"""

from __future__ import annotations

import glob
import io
from typing import Iterator

import numpy as np
from PIL import Image

from training import data

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
SHARD_BITS, SAMPLE_BITS = 20, 24  # position = ((epoch << 20 | shard) << 24) | sample


def shard_paths(patterns: list[str]) -> list[str]:
    paths = sorted(p for pattern in patterns for p in glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"--webdataset_shards {patterns} matches no tar file.")
    return paths


def read_shard(path: str) -> Iterator[tuple[bytes, str]]:
    """(image bytes, caption) of each sample of one shard, in order (webdataset's tar reader)."""
    import webdataset as wds

    for sample in wds.WebDataset([path], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            raise ValueError(f"Sample {sample['__key__']} in {path} has no image ({', '.join(IMAGE_KEYS)}).")
        yield image, sample["txt"].decode().strip() if "txt" in sample else ""


def rank_stream(paths: list[str], seed: int, rank: int, world_size: int) -> Iterator[tuple[int, bytes, str]]:
    """Endless (position, image bytes, caption) of this process, epoch after epoch."""
    if len(paths) < world_size:
        raise ValueError(f"{len(paths)} shards for {world_size} processes: give at least one shard per process.")
    epoch = 0
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(len(paths))
        for shard in order[rank::world_size]:
            for index, (image, caption) in enumerate(read_shard(paths[shard])):
                yield ((epoch << SHARD_BITS | int(shard)) << SAMPLE_BITS) | index, image, caption
        epoch += 1


def grouped(stream, batch_size: int, bucket_of) -> Iterator[list[tuple[int, bytes, str, int]]]:
    """Micro-batches of `batch_size` samples of one bucket each (bucket_of(image bytes) -> bucket)."""
    buffers: dict[int, list] = {}
    for position, image, caption in stream:
        bucket = bucket_of(image)
        buffers.setdefault(bucket, []).append((position, image, caption, bucket))
        if len(buffers[bucket]) == batch_size:
            yield buffers.pop(bucket)


def header_size(image: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(image)) as opened:
        return opened.size


class ShardBatches:
    """Endless micro-batches from shards: pixel_values, input_ids (captions varied per position), index/position."""

    def __init__(self, paths, transform: data.ImageTransform, variation, batch_size: int, seed: int, rank: int,
                 world_size: int, table=None):
        self.transform, self.variation, self.table, self.seed = transform, variation, table, seed
        stream = rank_stream(paths, seed, rank, world_size)
        self.batches = grouped(stream, batch_size, self.bucket_of)

    def bucket_of(self, image: bytes) -> int:
        if self.table is None:
            return 0
        from training.buckets import nearest_bucket

        return nearest_bucket(header_size(image), self.table)

    def skip(self, micro_steps: int) -> "ShardBatches":
        for _ in range(micro_steps):  # headers only: no image of a skipped batch is decoded
            next(self.batches)
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        items = next(self.batches)
        size = self.table[items[0][3]] if self.table is not None else None
        captions = [self.variation.text_of(caption, position) for position, _, caption, _ in items]
        return {**data.collate([self.item(image, position, size) for position, image, _, _ in items]),
                "input_ids": data.tokenize(self.variation.tokenizer, captions)}

    def item(self, image: bytes, position: int, size) -> data.Item:
        """One sample, transformed; its stream position is also its index (streamed data has no list)."""
        decoded = Image.open(io.BytesIO(image)).convert("RGB")
        pixels, crop, _ = self.transform.apply(decoded, np.random.default_rng((self.seed, position)), size)
        return data.Item(pixels, position, position, (decoded.height, decoded.width), crop)


def first_samples(paths: list[str], count: int) -> list[data.ImageSource]:
    """The first `count` samples of the first shards, in memory (the validation batch)."""
    sources = []
    for path in paths:
        for image, caption in read_shard(path):
            sources.append(data.ImageSource(caption, image=Image.open(io.BytesIO(image)).convert("RGB")))
            if len(sources) == count:
                return sources
    return sources


def all_captions(paths: list[str]) -> list[str]:
    """Every caption (one pass over the shards; for a from-scratch tokenizer's vocabulary)."""
    return [caption for path in paths for _, caption in read_shard(path)]
