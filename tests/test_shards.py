"""WebDataset shards: streamed batches, one bucket each, disjoint across processes, bit-exact resume."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from training import data, shards
from training.buckets import bucket_table
from training.captions import CaptionVariation
from training.tokenizer import build_clip_tokenizer

wds = pytest.importorskip("webdataset", reason="webdataset is part of the [train] extra")
SIZES = [(40, 24), (24, 40), (32, 32), (48, 16), (32, 32), (40, 24)]


def write_shards(folder, count=3, per_shard=6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(count):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as writer:
            for i in range(per_shard):
                image = Image.new("RGB", SIZES[i], (40 * s, 30 * i, 100))
                writer.write({"__key__": f"{s:03d}-{i:03d}", "png": image, "txt": f"a red circle, number {s} {i}"})
    return [str(folder / "shard-*.tar")]


def shard_batches(patterns, tmp_path, rank=0, world_size=1, table=None):
    tokenizer = build_clip_tokenizer(["a", "red", "circle", "number"] + [str(i) for i in range(10)], tmp_path / "tok")
    variation = CaptionVariation([], tokenizer, 0, keep_tokens=1, shuffle=True)
    return shards.ShardBatches(shards.shard_paths(patterns), data.ImageTransform(32, random_flip=True), variation,
                               2, 0, rank, world_size, table)


def test_ranks_read_disjoint_shards_every_sample_once_per_epoch(tmp_path):
    patterns = write_shards(tmp_path / "shards", count=4, per_shard=4)
    per_rank = []
    for rank in range(2):
        batches = shard_batches(patterns, tmp_path, rank, 2)
        per_rank.append([p for _ in range(4) for p in next(batches)["position"].tolist()])  # 2 shards x 4 samples
    first, second = (set(p) for p in per_rank)
    assert not first & second and len(first | second) == 16
    assert {(p >> shards.SAMPLE_BITS) >> shards.SHARD_BITS for p in first | second} == {0}  # all of epoch 0


def test_bucketed_shard_batches_have_one_shape_and_resume_exactly(tmp_path):
    patterns = write_shards(tmp_path / "shards")
    table = bucket_table(32, 8, 16, 64)
    batches = shard_batches(patterns, tmp_path, table=table)
    uninterrupted = [next(batches) for _ in range(10)]  # more than one epoch (18 samples)
    for batch in uninterrupted:
        assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 2
    assert {tuple(b["pixel_values"].shape[2:]) for b in uninterrupted} >= {(32, 32), (24, 40), (40, 24)}
    resumed = shard_batches(patterns, tmp_path, table=table).skip(6)
    for expected in uninterrupted[6:]:
        got = next(resumed)
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["position"], expected["position"])


def shard_run_args(patterns, out, *extra, steps):
    from test_train import args

    return args(out, "--webdataset_shards", *patterns, "--enable_bucket", "--bucket_reso_steps", "8",
                "--num_validation_samples", "2", "--train_batch_size", "2", "--shuffle_caption", *extra, steps=steps)


def test_shard_training_resumes_bit_exact(tmp_path):
    from test_train import summary

    from training.train import main

    patterns = write_shards(tmp_path / "shards")
    extra = ["--checkpointing_steps", "3", "--lr_scheduler", "constant", "--learning_rate", "1e-3"]
    main(shard_run_args(patterns, tmp_path / "full", *extra, steps=6))
    main(shard_run_args(patterns, tmp_path / "parted", *extra, steps=3))
    main(shard_run_args(patterns, tmp_path / "parted", *extra, "--resume_from_checkpoint", "latest", steps=6))
    assert summary(tmp_path / "parted")["loss_history"] == summary(tmp_path / "full")["loss_history"][3:]
    with pytest.raises(ValueError, match="--webdataset_shards streams pixels"):
        main(shard_run_args(patterns, tmp_path / "x", "--dataloader_num_workers", "1", steps=1))


@pytest.mark.slow
def test_two_processes_stream_disjoint_shards(tmp_path):
    from test_buckets import two_processes_recording

    patterns = write_shards(tmp_path / "shards", count=4, per_shard=6)
    out = tmp_path / "ddp"
    ranks = two_processes_recording(shard_run_args(patterns, out, steps=4), out)
    shard_of = lambda p: (p >> shards.SAMPLE_BITS) & ((1 << shards.SHARD_BITS) - 1)
    used = [{shard_of(p) for batch in r for p in batch["position"]} for r in ranks]
    assert not used[0] & used[1]  # disjoint shards
