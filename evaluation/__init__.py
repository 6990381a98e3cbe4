"""Evaluation of text-to-image models on the `shapes` dataset.

`judge` reads a generated image's five attributes with classical vision (prompt adherence);
`adherence` generates images for fixed prompt sets and scores them with the judge;
`features` is the shipped shapes feature network and `metrics` the distribution-level scores
(FID, Inception-style score, precision/recall) computed with torchmetrics in its feature space.
`training/` does not depend on this package.
"""
