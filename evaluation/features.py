"""The shapes feature network: a small CNN that classifies the five attributes of a `shapes` image.

It plays Inception's part for this dataset: its penultimate activations (`FEATURES` numbers per
image) are the feature space of FID and precision/recall, and its per-attribute softmax gives the
Inception-style score. Trained by `python -m evaluation.train_features` on generator images and
shipped as `evaluation/weights/shapes_features.safetensors` (its architecture in the file's metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from training.shapes import COLORS, POSITIONS, SHAPES, SIZES, all_combinations

WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_features.safetensors"
HEADS = {
    "shape": tuple(SHAPES),
    "color": tuple(COLORS),
    "background": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}


def _block(channels_in: int, channels_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1), nn.BatchNorm2d(channels_out), nn.ReLU())


class ShapesFeatureNet(nn.Module):
    """64x64 RGB -> `num_features` features -> one logit vector per attribute (`HEADS`).

    Input: uint8 images (N, 3, 64, 64) in 0..255, or float images in [0, 1].
    """

    def __init__(self, width: int = 16, num_features: int = 128):
        super().__init__()
        self.config = {"width": width, "num_features": num_features}
        self.trunk = nn.Sequential(
            _block(3, width, stride=2),  # 32x32
            _block(width, 2 * width), nn.MaxPool2d(2),  # 16x16
            _block(2 * width, 4 * width), nn.MaxPool2d(2),  # 8x8
            _block(4 * width, 4 * width), nn.MaxPool2d(2),  # 4x4: position stays in the layout
            nn.Flatten(),
            nn.Linear(4 * width * 16, num_features), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(num_features, len(values)) for name, values in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, num_features) penultimate activations: the FID / precision-recall feature space."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return self.trunk(images * 2.0 - 1.0)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute, (N, number of values) logits."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Per image, the most probable value of each attribute."""
        indices = {name: logit.argmax(-1).tolist() for name, logit in self.logits(images).items()}
        return [{name: HEADS[name][indices[name][k]] for name in HEADS} for k in range(len(images))]

    def save(self, path: Path) -> None:
        """Atomic write of the weights (safetensors) with the architecture in the metadata."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"config": json.dumps(self.config)})
        tmp.replace(path)


def load_feature_net(path: Path | str = WEIGHTS) -> ShapesFeatureNet:
    """The trained network (eval mode) from a safetensors file written by `ShapesFeatureNet.save`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No shapes feature network at {path}: train one with `python -m evaluation.train_features --out {path}`."
        )
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    net = ShapesFeatureNet(**config)
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> a uint8 (N, 3, H, W) tensor, the input torchmetrics and the network take."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


class Features(nn.Module):
    """The network's penultimate features, shaped as torchmetrics' `feature=` module wants."""

    def __init__(self, net: ShapesFeatureNet):
        super().__init__()
        self.net = net
        self.num_features = net.config["num_features"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)


class CombinationLogits(nn.Module):
    """Log-probabilities of the 1,680 attribute combinations: the sum of the heads' log-softmax.

    The heads' product distribution, so `softmax` of this output (what torchmetrics'
    InceptionScore applies) is p(combination | image) renormalised over valid combinations.
    """

    def __init__(self, net: ShapesFeatureNet):
        super().__init__()
        self.net = net
        index = {name: {value: k for k, value in enumerate(values)} for name, values in HEADS.items()}
        combos = all_combinations()
        for name in HEADS:
            self.register_buffer(f"index_{name}", torch.tensor([index[name][getattr(c, name)] for c in combos]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net.logits(images)
        return sum(logit.log_softmax(-1)[:, getattr(self, f"index_{name}")] for name, logit in logits.items())
