"""Training data: image folders, the shapes pool, batch order, captions, transforms."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training import data, shapes
from training.tokenizer import build_clip_tokenizer


def write_folder(root, captions: dict[str, str], metadata: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", (40 + 8 * i, 32), (30 * i, 100, 200)).save(root / name)
        if not metadata:
            (root / name).with_suffix(".txt").write_text(caption + "\n")
    if metadata:
        lines = [json.dumps({"file_name": n, "text": c}) for n, c in captions.items()]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("metadata", [True, False])
def test_image_folder_reads_captions_and_skips_unreadable_images(tmp_path, metadata, caplog):
    captions = {"a.png": "a red circle", "b.png": "a blue square", "c.jpg": "a green triangle"}
    write_folder(tmp_path, captions, metadata)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    broken = ["broken.png", "truncated.jpg", "truncated.png"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name in broken[1:]:  # header intact, half the pixel data cut (Image.verify() passes the JPEG)
        noise.save(tmp_path / name)
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[: (tmp_path / name).stat().st_size // 2])
    for name in broken:
        if metadata:
            with open(tmp_path / "metadata.jsonl", "a") as f:
                f.write(json.dumps({"file_name": name, "text": "broken"}) + "\n")
        else:
            (tmp_path / name).with_suffix(".txt").write_text("broken")
    with caplog.at_level(logging.WARNING):
        sources, skipped = data.folder_sources(str(tmp_path))
    assert skipped == 3 and all(name in caplog.text for name in broken)
    assert {s.path.name: s.caption for s in sources} == captions


def test_missing_folder_and_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_data_dir .* does not exist"):
        data.folder_sources(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--train_data_dir .* has no readable images"):
        data.folder_sources(str(tmp_path / "empty"))


def test_metadata_with_wrong_keys_names_the_flags(tmp_path):
    write_folder(tmp_path, {"a.png": "x"}, metadata=True)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="--image_column/--caption_column"):
        data.folder_sources(str(tmp_path))


@pytest.mark.parametrize("line, message", [
    ('{"file_name": "a.png", "text": ', "line 2 is not valid JSON"),
    ('["a.png", "x"]', "line 2 lacks 'file_name' or 'text'"),
    ('{"file_name": "../secret.png", "text": "x"}', "line 2: 'file_name' must be a file name inside the folder"),
])
def test_bad_metadata_line_names_the_file_and_line(tmp_path, line, message):
    write_folder(tmp_path, {"a.png": "x"}, metadata=True)
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=f"metadata.jsonl {message}".replace("[", "\\[").replace("(", "\\(")):
        data.folder_sources(str(tmp_path))


def test_transform_resizes_crops_and_scales_to_unit_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    transform = data.ImageTransform(32, center_crop=False)
    a = transform(image, np.random.default_rng(1))
    b = transform(image, np.random.default_rng(1))
    assert a.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)  # same rng, same crop
    same = data.ImageTransform(64)(Image.new("RGB", (64, 64), (255, 0, 0)), np.random.default_rng(0))
    assert torch.allclose(same[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_flip_is_off_by_default_and_flips_when_asked():
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255  # left half white
    image = Image.fromarray(array)
    rngs = [np.random.default_rng(i) for i in range(20)]
    assert all(data.ImageTransform(8, center_crop=True)(image, r)[0, 0, 0] == 1 for r in rngs)
    flipped = [data.ImageTransform(8, True, random_flip=True)(image, np.random.default_rng(i))[0, 0, 0] for i in range(20)]
    assert -1 in flipped and 1 in flipped


def test_batch_order_is_a_function_of_the_step_and_ranks_are_disjoint():
    order = data.BatchOrder(num_samples=10, batch_size=3, seed=5)
    assert order.keys(7) == data.BatchOrder(10, 3, 5).keys(7)
    epoch0 = [i for step in range(3) for i, _ in order.keys(step)] + [order.keys(3)[0][0]]
    assert sorted(epoch0) == list(range(10))  # the first epoch visits every sample once
    ranks = [data.BatchOrder(100, 4, 5, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        a, b = ({p for _, p in r.keys(step)} for r in ranks)
        assert not a & b
    single = data.BatchOrder(100, 8, 5)
    assert [k for _, k in single.keys(2)] == sorted(p for r in ranks for _, p in r.keys(2))


def test_resumed_batches_equal_uninterrupted_batches():
    dataset = data.ImageDataset(data.shapes_sources(0, 12), data.ImageTransform(64, random_flip=True), seed=3)
    order = data.BatchOrder(12, 4, seed=3)
    full = data.image_batches(dataset, order, 0, num_workers=0)
    uninterrupted = [next(full) for _ in range(5)]
    resumed = data.image_batches(dataset, order, 3, num_workers=0)
    for expected in uninterrupted[3:]:
        got = next(resumed)
        assert torch.equal(got["pixel_values"], expected["pixel_values"]) and torch.equal(got["index"], expected["index"])


def test_shapes_pool_is_train_split_with_paraphrases_and_validation_is_separate():
    train = data.shapes_sources(0, 200)
    validation = data.shapes_validation_sources(20)
    canonical = {a.caption() for a in shapes.combinations("train")}
    assert any(s.caption not in canonical for s in train)  # paraphrased
    assert all(s.caption in canonical for s in validation)
    assert [s.caption for s in data.shapes_sources(0, 200)] == [s.caption for s in train]
    held_out = {a.caption() for a in shapes.held_out_combinations()}
    assert not any(s.caption in held_out for s in train + validation)


def test_shapes_vocabulary_makes_every_word_one_token(tmp_path):
    tokenizer = build_clip_tokenizer(data.shapes_vocabulary(), tmp_path, model_max_length=20)
    for sample in shapes.generate(1, 300, paraphrases=True):
        ids = tokenizer(sample.caption).input_ids
        assert len(ids) == len(sample.caption.split()) + 2, sample.caption
    assert len(tokenizer(shapes.Attributes("triangle", "purple", "orange", "large", "bottom right").caption()).input_ids) <= 20


def test_caption_dropout_rate_and_empty_ids(tmp_path):
    tokenizer = build_clip_tokenizer(["a", "red", "circle"], tmp_path, model_max_length=8)
    ids = data.tokenize(tokenizer, ["a red circle"] * 4000)
    empty = data.tokenize(tokenizer, [""])[0]
    dropped = data.drop_captions(ids, empty, 0.1, torch.Generator().manual_seed(0))
    rate = (dropped == empty).all(dim=1).float().mean().item()
    assert 0.08 < rate < 0.12
    assert torch.equal(data.drop_captions(ids, empty, 0.0, torch.Generator()), ids)


def test_resolution_must_divide_by_vae_factor():
    data.check_resolution(64, 4)
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 8"):
        data.check_resolution(60, 8)


def test_latent_sample_uses_posterior_moments():
    batch = {"latent_mean": torch.full((2, 4, 2, 2), 3.0), "latent_std": torch.zeros(2, 4, 2, 2)}
    assert torch.equal(data.latent_sample(batch, 0.5, torch.Generator()), torch.full((2, 4, 2, 2), 1.5))


def test_latent_cache_path_changes_with_everything_that_determines_the_latents():
    """A cache is reused only for the same data, geometry and VAE (a changed option must not reuse stale latents)."""
    from training.config import parse_config
    from training.tiny_models import tiny_vae
    from training.validation import latent_cache_path

    vae, sources = tiny_vae(), data.shapes_validation_sources(2)
    dataset = lambda config: data.ImageDataset(sources, data.ImageTransform(config.data.resolution), 0)
    path = lambda *flags: latent_cache_path(vae, dataset(config := parse_config(list(flags))), config, "train")
    base = path("--resolution", "32")
    assert base == path("--resolution", "32") and base.name.startswith("latents-train-")
    changed = [path("--resolution", "16"), path("--resolution", "32", "--center_crop"),
               path("--resolution", "32", "--train_data_dir", "elsewhere"), path("--resolution", "32", "--seed", "1"),
               path("--resolution", "32", "--shapes_colors", "red")]
    assert len({base, *changed}) == 1 + len(changed)
