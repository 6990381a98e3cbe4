"""One generation setting -> every score: FID, IS, precision, recall (shapes features) and the judge.

The prompt set is `adherence.evaluation_combinations(per_split)` (seen, then held-out); the real
reference draws the same combinations with the dataset generator (seed REAL_SEED) and a second,
independent draw (FLOOR_SEED) gives the noise floor: the scores of perfect images at this size.
Used by `ldm-evaluate` and by `benchmarks/quality_study.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from evaluation import metrics
from evaluation.adherence import SPLITS, evaluation_combinations, generate
from evaluation.features import ShapesFeatureNet, to_uint8
from evaluation.judge import Scores, score
from training import shapes
from training.shapes import Attributes

REAL_SEED, FLOOR_SEED = 31, 32


def real_images(combos: list[Attributes], seed: int) -> torch.Tensor:
    """One generator image per combination (uint8 N x 3 x 64 x 64), seeded."""
    rng = np.random.default_rng(seed)
    return to_uint8([shapes.render(attributes, rng)[0] for attributes in combos])


@dataclass(frozen=True)
class Reference:
    """The prompt set per split and its real images (reference draw and noise-floor draw)."""

    combos: dict[str, list[Attributes]]
    real: torch.Tensor
    floor: torch.Tensor

    @property
    def ordered(self) -> list[Attributes]:
        return [a for split in SPLITS for a in self.combos[split]]

    def noise_floor(self, net: ShapesFeatureNet) -> metrics.DistributionScores:
        return metrics.distribution_scores(net, self.real, self.floor)


def reference(per_split: int) -> Reference:
    combos = evaluation_combinations(per_split)
    ordered = [a for split in SPLITS for a in combos[split]]
    return Reference(combos, real_images(ordered, REAL_SEED), real_images(ordered, FLOOR_SEED))


@dataclass(frozen=True)
class Quality:
    """The scores of one generation setting: distribution-level (both splits) and the judge per split."""

    distribution: metrics.DistributionScores
    judged: dict[str, Scores]
    images: list[Image.Image]


def measure(pipe, net: ShapesFeatureNet, ref: Reference, steps: int, guidance: float, batch_size: int = 64,
            progress=None, **options) -> Quality:
    """Generate one image per prompt of `ref` (seeded, `adherence.generate`) and score them."""
    ordered = ref.ordered
    images = generate(pipe, [a.caption() for a in ordered], steps, guidance, batch_size, progress, **options)
    judged, offset = {}, 0
    for split in SPLITS:
        count = len(ref.combos[split])
        judged[split] = score(zip(images[offset : offset + count], ref.combos[split]))
        offset += count
    return Quality(metrics.distribution_scores(net, ref.real, to_uint8(images)), judged, images)
