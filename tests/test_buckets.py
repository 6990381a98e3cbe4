"""Aspect-ratio bucketing: the bucket table, one shape per batch, every image once per epoch, resume, ranks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from training import data
from training.buckets import BucketBatchOrder, assign_buckets, bucket_table, describe, nearest_bucket
from training.config import FineTuneDataOptions

# kohya's sd-scripts `make_bucket_resolutions((512, 512), 256, 1024, 64)`: each width with the largest
# height (multiple of 64, <= 1024) whose area stays <= 512^2, both orientations.
WIDE_512 = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
            (1024, 256)]
KOHYA_512 = set(WIDE_512) | {(h, w) for w, h in WIDE_512}
SIZES = [(40, 24), (24, 40), (32, 32), (64, 16), (33, 31), (50, 20), (20, 50), (36, 28), (16, 60), (45, 25)]


def test_bucket_table_matches_kohya_and_keeps_area_and_step():
    table = bucket_table(512, 64, 256, 1024)
    assert set(table) == KOHYA_512
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 256 <= min(w, h) for w, h in table)
    with pytest.raises(ValueError, match="multiples of --bucket_reso_steps 64"):
        bucket_table(512, 64, 250, 1024)
    with pytest.raises(ValueError, match="must lie within"):
        bucket_table(2048, 64, 256, 1024)


def test_nearest_bucket_by_log_aspect_ratio():
    table = bucket_table(512, 64, 256, 1024)
    assert table[nearest_bucket((1000, 1000), table)] == (512, 512)
    assert table[nearest_bucket((1920, 1080), table)] == (640, 384)  # 1.78 -> 1.67 (nearest of 1.67 and 2.2)
    assert table[nearest_bucket((1080, 1920), table)] == (384, 640)  # portrait mirrors landscape
    with pytest.raises(ValueError, match="multiple of 8"):
        assign_buckets(FineTuneDataOptions(enable_bucket=True, bucket_reso_steps=12), 32, 8, [(32, 32)])


def mixed_sources(tmp_path, repeats=None) -> list[data.ImageSource]:
    sources = []
    for i, (w, h) in enumerate(SIZES):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (w, h), (20 * i, 100, 200)).save(path)
        sources.append(data.ImageSource(f"image {i}", path=path, repeats=(repeats or [1] * len(SIZES))[i]))
    return sources


def bucketed(sources, batch_size=3, rank=0, world_size=1):
    options = FineTuneDataOptions(enable_bucket=True, bucket_reso_steps=8)
    table, buckets = assign_buckets(options, 32, 4, [s.size() for s in sources])
    dataset = data.ImageDataset(sources, data.ImageTransform(32, random_flip=True), 7, [table[b] for b in buckets])
    order = BucketBatchOrder(buckets, [s.repeats for s in sources], batch_size, 7, rank, world_size)
    return dataset, order, table, buckets


def test_batches_have_one_shape_and_each_image_appears_once_per_epoch_times_repeats(tmp_path):
    repeats = [1, 2, 1, 3, 1, 1, 2, 1, 1, 1]
    dataset, order, table, buckets = bucketed(mixed_sources(tmp_path, repeats))
    assert len({table[b] for b in buckets}) >= 4 and all(w * h <= 32 * 32 for w, h in table)
    assert "items/epoch" in describe(table, buckets, repeats)
    batches = data.image_batches(dataset, order, 0, num_workers=0)
    for epoch in range(2):
        seen = Counter()
        for _ in range(order.batches_per_epoch):
            batch = next(batches)
            index = batch["index"].tolist()
            assert len({table[buckets[i]] for i in index}) == 1  # one bucket per batch
            width, height = table[buckets[index[0]]]
            assert batch["pixel_values"].shape[1:] == (3, height, width)
            for i, original, crop in zip(index, batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
                assert tuple(original) == (SIZES[i][1], SIZES[i][0])  # (height, width) of the file
                assert 0 <= crop[0] and 0 <= crop[1]
            assert set(map(tuple, batch["target_size"].tolist())) == {(height, width)}  # SDXL's target: the bucket
            seen.update(index)
        assert seen == Counter({i: r for i, r in enumerate(repeats)}), epoch
    assert sum(repeats) == order.items_per_epoch


def test_bucketed_batches_resume_bit_exact_and_ranks_are_disjoint(tmp_path):
    dataset, order, _, _ = bucketed(mixed_sources(tmp_path))
    full = data.image_batches(dataset, order, 0, num_workers=0)
    uninterrupted = [next(full) for _ in range(9)]
    fresh_dataset, fresh_order, _, _ = bucketed(mixed_sources(tmp_path))  # a new process after the restart
    resumed = data.image_batches(fresh_dataset, fresh_order, 5, num_workers=0)
    for expected in uninterrupted[5:]:
        got = next(resumed)
        assert torch.equal(got["pixel_values"], expected["pixel_values"]) and torch.equal(got["index"], expected["index"])
    ranks = [bucketed(mixed_sources(tmp_path), batch_size=2, rank=r, world_size=2)[1] for r in range(2)]
    single = bucketed(mixed_sources(tmp_path), batch_size=2)[1]
    for step in range(6):
        a, b = ({p for _, p in r.keys(step)} for r in ranks)
        assert not a & b
        assert sorted(a | b) == sorted(p for s in (2 * step, 2 * step + 1) for _, p in single.keys(s))


# ---------------------------------------------------------------- end to end


def bucket_run_args(folder, out, *extra, steps):
    from test_train import args

    return args(out, "--dataset", "folder", "--train_data_dir", str(folder), "--enable_bucket",
                "--bucket_reso_steps", "8", "--num_validation_samples", "2", "--train_batch_size", "2",
                *extra, steps=steps)


def write_mixed_folder(folder) -> None:
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (20 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red circle", "a blue square"][i % 2])


@pytest.mark.parametrize("cache", [[], ["--cache_latents"]], ids=["pixels", "cached-latents"])
def test_bucketed_training_resumes_bit_exact(tmp_path, caplog, cache):
    import json
    import logging

    from safetensors.torch import load_file

    from training.train import main

    folder = tmp_path / "images"
    write_mixed_folder(folder)
    extra = ["--checkpointing_steps", "3", "--lr_scheduler", "constant", "--learning_rate", "1e-3", "--random_flip",
             *cache]
    with caplog.at_level(logging.INFO, logger="training"):
        main(bucket_run_args(folder, tmp_path / "full", *extra, steps=6))
    assert "Aspect-ratio buckets:" in caplog.text and "64 x 16 | 4.00" in caplog.text
    main(bucket_run_args(folder, tmp_path / "parted", *extra, steps=3))
    main(bucket_run_args(folder, tmp_path / "parted", *extra, "--resume_from_checkpoint", "latest", steps=6))
    full, parted = (json.loads((tmp_path / r / "train_summary.json").read_text()) for r in ("full", "parted"))
    assert parted["loss_history"] == full["loss_history"][3:]
    if cache:  # one latent per image, of its bucket's shape (8 training images; 64x16 pixels -> 4x8x32 latents)
        [file] = (tmp_path / "full" / "cache").glob("latents-train-*.safetensors")
        latents = load_file(file)
        assert sum(k.startswith("latent_") for k in latents) == 2 * 8 and latents["latent_mean.3"].shape == (4, 8, 32)
    with pytest.raises(ValueError, match="--enable_bucket trains the diffusion model; --train_vae"):
        main(bucket_run_args(folder, tmp_path / "x", "--train_vae", steps=1))


def two_processes_recording(run_args: list[str], out) -> list[list[dict]]:
    """`accelerate launch --multi_gpu --num_processes 2` (two gloo CPU processes) of a 4-step run with
    --record_data_order; each process's batches (index, position), checked to hold disjoint samples."""
    import json
    import subprocess

    from test_train import ENV, REPO

    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train", *run_args,
               "--record_data_order"]
    result = subprocess.run(command, cwd=REPO, env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training distributed (gloo) over 2 processes" in result.stderr
    ranks = [[json.loads(line) for line in (out / f"data_order-rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]
    positions = [{p for batch in r for p in batch["position"]} for r in ranks]
    assert not positions[0] & positions[1]  # disjoint samples
    return ranks


@pytest.mark.slow
def test_two_processes_read_disjoint_bucketed_batches(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "images"
    write_mixed_folder(folder)
    out = tmp_path / "ddp"
    ranks = two_processes_recording(bucket_run_args(folder, out, steps=4), out)
    # Together the two processes read the first 8 batches of the single-process stream, each of one bucket.
    sources, _ = data.folder_sources(str(folder))
    options = FineTuneDataOptions(enable_bucket=True, bucket_reso_steps=8)
    table, buckets = assign_buckets(options, 32, 4, [s.size() for s in sources[:-2]])
    single = BucketBatchOrder(buckets, [1] * len(buckets), 2, 3)
    expected = [single.keys(step) for step in range(8)]
    got = [list(zip(ranks[k % 2][k // 2]["index"], ranks[k % 2][k // 2]["position"])) for k in range(8)]
    assert got == expected
    StableDiffusionPipeline.from_pretrained(out / "model")
