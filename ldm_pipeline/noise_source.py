"""Where a call's randomness comes from: per-image seeds, or stock diffusers' `generator=` / `latents=`.

Our convenience form is a seed per image (`seed`, image j gets seed + j): each image draws its
noise, its VAE posterior sample (img2img, inpainting) and its sampler noise from its own
`torch.Generator("cpu").manual_seed(seed_j)`, so an image depends only on its seed. That is
exactly stock diffusers called with `generator=[torch.Generator().manual_seed(s) for s in seeds]`.

`generator=` (one `torch.Generator` or a list, one per image) takes precedence over `seed` and is
used as stock uses it: a list gives each image its own stream; one generator draws the whole
batch's noise in one call. What the recipe of image j records (`recipe_fields`):

* a list of fresh generators (or one for a one-image call): ``seed`` = that generator's
  `initial_seed()`; the recipe regenerates the image like any seeded one;
* one generator shared by n > 1 images: ``seed`` = its `initial_seed()` and
  ``noise = {"source": "shared_generator", "images": n, "index": j}``: the image is reproduced
  by rerunning the whole call with `generator=torch.Generator().manual_seed(seed)`;
* a generator used before the call (its state is no longer `manual_seed(initial_seed())`):
  ``noise = {"source": "used_generator"}``, ``seed`` = None;
* `latents=` (the caller's initial noise, not stored): ``noise = {"source": "latents"}``.

A recipe with a ``noise`` entry cannot be turned back into options by itself
(`metadata.recipe_to_options` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm_pipeline import options  # (options -> metadata -> noise: attribute use only, at call time)


@dataclass
class NoiseSource:
    """The generator(s) handed to `randn_tensor`, the VAE posterior and `scheduler.step`, and what recipes record."""

    generator: torch.Generator | list[torch.Generator]
    seeds: list[int | None]  # per image: the seed recorded in its recipe (None: not reproducible from a seed)
    source: str | None = None  # None: each image's own fresh generator; else "shared_generator" | ...

    @classmethod
    def of(cls, opts, count: int) -> "NoiseSource":
        """The source for a checked `GenerationOptions` making `count` images."""
        source = cls._from_generator(opts.generator, count) if opts.generator is not None else None
        if source is None:
            seeds = options.image_seeds(opts.seed, count)
            source = cls([torch.Generator("cpu").manual_seed(s) for s in seeds], seeds)
        if opts.latents is not None:
            source.source = "latents"
        return source

    @classmethod
    def _from_generator(cls, generator, count: int) -> "NoiseSource":
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        seeds = [g.initial_seed() if is_fresh(g) else None for g in generators]
        if None in seeds:
            return cls(generator if isinstance(generator, torch.Generator) else list(generator), [None] * count,
                       "used_generator")
        if isinstance(generator, torch.Generator) and count > 1:
            return cls(generator, seeds * count, "shared_generator")
        return cls(list(generators), seeds)

    def recipe_fields(self, index: int, count: int) -> dict:
        """The `seed` (and, when a seed alone does not give the noise, `noise`) of image `index`'s recipe."""
        fields = {"seed": self.seeds[index]}
        if self.source == "shared_generator":
            fields["noise"] = {"source": self.source, "images": count, "index": index}
        elif self.source is not None:
            fields["noise"] = {"source": self.source}
        return fields


def is_fresh(generator: torch.Generator) -> bool:
    """True when `generator` is still in the state `manual_seed(initial_seed())` left it in."""
    fresh = torch.Generator(generator.device).manual_seed(generator.initial_seed())
    return torch.equal(fresh.get_state(), generator.get_state())


NOISE_EXPLANATIONS = {
    "shared_generator": "one torch.Generator drew the noise of all {images} images of its call (this is image "
                        "{index}); rerun that call with generator=torch.Generator().manual_seed(seed)",
    "used_generator": "its torch.Generator had been used before the call, so no seed gives its noise",
    "latents": "its initial noise was passed as `latents`, which the recipe does not store",
}


def explain_noise(noise: dict) -> str:
    """Why a recipe with a `noise` entry cannot regenerate its image from the seed alone."""
    text = NOISE_EXPLANATIONS.get(noise.get("source"), "its noise came from {source}")
    return text.format(**{"images": "?", "index": "?", **noise})
