"""Distribution-level scores of generated images against real `shapes` images.

All in the shapes feature network's space (`evaluation.features`), computed with torchmetrics:

* FID: Frechet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017,
  eq. 6: |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))), torchmetrics'
  `FrechetInceptionDistance(feature=...)`;
* Inception-style score: exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), torchmetrics'
  `InceptionScore(feature=...)` over the 1,680 attribute combinations, one split;
* improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3): the fraction of generated
  features inside the real manifold (the union of balls reaching each real feature's k-th nearest
  real neighbour), and the reverse.

The stock metrics on real models: `inception_fid` (torchmetrics' default Inception FID, from a
local weights file, never downloaded) and `clip_score` (a local CLIP folder).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.features import CombinationLogits, Features, ShapesFeatureNet

BATCH = 256


@dataclass(frozen=True)
class DistributionScores:
    """FID, Inception-style score, precision and recall of one image set against a real one."""

    count: int
    fid: float
    inception_score: float
    precision: float
    recall: float


def _batches(images: torch.Tensor):
    return images.split(BATCH)


@torch.no_grad()
def fid(net: ShapesFeatureNet, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID in the shapes feature space; `real`, `fake`: uint8 (N, 3, 64, 64) images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Features(net))
    for chunk in _batches(real):
        metric.update(chunk, real=True)
    for chunk in _batches(fake):
        metric.update(chunk, real=False)
    return float(metric.compute())


@torch.no_grad()
def inception_score(net: ShapesFeatureNet, images: torch.Tensor) -> float:
    """exp(mean KL(p(y|x) || p(y))) over attribute combinations y; at most the number of images."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # "will save all extracted features in buffer": a few MB here
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=CombinationLogits(net), splits=1)
    for chunk in _batches(images):
        metric.update(chunk)
    with warnings.catch_warnings():  # the std over one split is undefined; only the mean is used
        warnings.simplefilter("ignore", UserWarning)
        return float(metric.compute()[0])


@torch.no_grad()
def features(net: ShapesFeatureNet, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.features(chunk) for chunk in _batches(images)]).double()


def _kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    return torch.cdist(points, points).kthvalue(k + 1, dim=1).values  # the 1st value is the point itself


def _inside_manifold(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: is it within some point's k-NN radius (Kynkaanniemi et al. 2019, eq. 2)?"""
    return (torch.cdist(queries, points) <= _kth_neighbour_radii(points, k)[None, :]).any(dim=1)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 3), k = 3 as in the paper."""
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images in each set.")
    precision = _inside_manifold(fake_features, real_features, k).double().mean()
    recall = _inside_manifold(real_features, fake_features, k).double().mean()
    return float(precision), float(recall)


def distribution_scores(net: ShapesFeatureNet, real: torch.Tensor, fake: torch.Tensor) -> DistributionScores:
    """All four scores of `fake` against `real` (uint8 image tensors)."""
    precision, recall = precision_recall(features(net, real), features(net, fake))
    return DistributionScores(len(fake), fid(net, real, fake), inception_score(net, fake), precision, recall)


# ---------------------------------------------------------------- stock metrics (local weights only)


def check_inception_weights(weights: str | Path) -> Path:
    """The path, if it is a file; else a FileNotFoundError saying what to pass."""
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"No Inception weights at {weights}: download torch-fidelity's pt_inception-2015-12-05-6726825d.pth "
            "(the FID Inception) on a connected machine and pass its path."
        )
    return Path(weights)


def check_clip_folder(folder: str | Path) -> Path:
    """The folder, if it holds a transformers model; else a FileNotFoundError saying what to pass."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(
            f"No CLIP model at {folder}: pass a local folder saved by transformers' CLIPModel.save_pretrained "
            "(with its processor), e.g. a snapshot of openai/clip-vit-base-patch16."
        )
    return Path(folder)


def inception_fid(weights: str | Path, real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' default FID (Inception-v3 pool features, 2048) from a local weights file.

    `weights`: torch-fidelity's `pt_inception-2015-12-05-6726825d.pth`; nothing is downloaded.
    """
    check_inception_weights(weights)
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except (ModuleNotFoundError, ImportError) as error:
        raise ImportError(
            f"Inception FID needs torch-fidelity and torchvision (pip install torch-fidelity torchvision): {error}"
        ) from error
    for chunk in _batches(real):
        metric.update(chunk, real=True)
    for chunk in _batches(fake):
        metric.update(chunk, real=False)
    return float(metric.compute())


def clip_score(clip_folder: str | Path, images: torch.Tensor, prompts: list[str]) -> float:
    """torchmetrics' CLIP score (100 * mean cosine of image and prompt embeddings) with a local CLIP folder."""
    folder = check_clip_folder(clip_folder)
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    load = lambda: (_ProjectedEmbeddings(CLIPModel.from_pretrained(folder, local_files_only=True)),
                    CLIPProcessor.from_pretrained(folder, local_files_only=True))
    metric = CLIPScore(model_name_or_path=load)
    for start in range(0, len(images), BATCH):
        metric.update(images[start : start + BATCH], prompts[start : start + BATCH])
    return float(metric.compute())


class _ProjectedEmbeddings(torch.nn.Module):
    """A CLIPModel whose `get_*_features` return the projected embeddings as tensors.

    transformers 5 returns an output object (projected embeddings in `pooler_output`), which
    torchmetrics 1.9's CLIPScore divides by its norm as if it were a tensor.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))
