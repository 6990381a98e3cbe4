"""Stages 1b and 1c of the shapes recipe (`training/recipes/shapes/finetune_decoder.py`) on a tiny VAE."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from scipy import ndimage

from evaluation import judge
from training import shapes
from training.data import to_pixels
from training.tiny_models import tiny_vae
from training.validation import to_pil

SCRIPT = Path(__file__).resolve().parents[1] / "training/recipes/shapes/finetune_decoder.py"
spec = importlib.util.spec_from_file_location("finetune_decoder", SCRIPT)
finetune_decoder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune_decoder)


def test_edge_mask_marks_pixels_next_to_a_colour_change():
    sample = shapes.generate(5, 1)[0]
    labels = judge.quantize(sample.image)
    expected = ndimage.maximum_filter(labels, 3, mode="nearest") != ndimage.minimum_filter(labels, 3, mode="nearest")
    mask = finetune_decoder.edge_mask(to_pixels([sample.image]))[0, 0].numpy().astype(bool)
    assert mask.any() and (mask == expected).all()
    assert not finetune_decoder.edge_mask(torch.zeros(1, 3, 8, 8)).any()


def test_edge_weight_reweights_the_loss_towards_edges():
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[:, :, :, 2:] = 1.0  # a vertical edge: columns 1 and 2 are edge pixels
    reconstruction = torch.zeros_like(pixels)  # error 1 + 1 = 2 on the right half, 0 on the left
    assert torch.isclose(finetune_decoder.reconstruction_loss(reconstruction, pixels, 1.0), torch.tensor(1.0))
    # weights: columns 0, 3 -> 1; columns 1, 2 -> 5. Weighted error (0 + 5*0 + 5*2 + 2) / (1 + 5 + 5 + 1) per row
    assert torch.isclose(finetune_decoder.reconstruction_loss(reconstruction, pixels, 5.0), torch.tensor(12 / 12))
    reconstruction[:, :, :, 3] = 1.0  # fix the non-edge column only: error left on the weighted column 2
    assert torch.isclose(finetune_decoder.reconstruction_loss(reconstruction, pixels, 5.0), torch.tensor(10 / 12))


def test_small_fraction_sets_the_share_of_small_shapes():
    def small_share(fraction: float) -> float:
        images = next(iter(finetune_decoder.batches(0, 64, fraction)))
        readings = [judge.read_attributes(image) for image in to_pil(images)]
        return float(np.mean([r.size == "small" for r in readings]))

    assert small_share(1.0) == 1.0 and small_share(0.0) == 0.0
    assert 0.6 < small_share(0.8) <= 0.95


def test_finetune_moves_the_decoder_only_and_saves_a_loadable_vae(tmp_path):
    tiny_vae(seed=0).save_pretrained(tmp_path / "vae")
    finetune_decoder.finetune(tmp_path / "vae", tmp_path / "out", steps=2, batch_size=2, lr=1e-2, seed=0,
                              save_every=1, small_fraction=0.5, edge_weight=4.0)
    before = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "out").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)
    assert any(name.startswith("decoder.") for name in changed)
