"""Captions as kohya's sd-scripts read and vary them.

Folders: an image's caption is the `.txt` or `.caption` file beside it; in a kohya-style
folder `N_name/` the image is seen N times per epoch, and `name` is its caption when it
has no caption file (DreamBooth-style "N_sks dog" folders).

Per-step variation of comma-separated tag captions ("1girl, red hair, smile"): the first
`keep_tokens` tags stay in place (a trigger word), each other tag is dropped with
probability `tag_dropout` (kohya's `caption_tag_dropout_rate`) and the rest are shuffled
(`shuffle_caption`). The randomness is seeded by (seed, stream position), so a resumed run
sees the captions an uninterrupted run would. Dropping the whole caption for classifier-free
guidance stays in the loss (`data.drop_captions`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

CAPTION_EXTENSIONS = (".txt", ".caption")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
CAPTION_STREAM = 0xCA  # separates the caption generator from the crop/flip generator of the same position


def kohya_folder(path: Path, root: Path) -> tuple[int, str] | None:
    """(repeats, name) of the nearest `N_name` folder between `root` and the image, if any."""
    for folder in Path(path).relative_to(root).parents:
        match = KOHYA_FOLDER.match(folder.name)
        if match:
            return int(match.group(1)), match.group(2).replace("_", " ").strip()
    return None


def folder_repeats(path: Path, root: Path) -> int:
    found = kohya_folder(path, root)
    if found and found[0] < 1:
        raise ValueError(f"Folder {path.parent} repeats its images {found[0]} times; use N >= 1 in N_name.")
    return found[0] if found else 1


def caption_of(path: Path, root: Path) -> str:
    """The caption file's text (.txt, then .caption), else a kohya folder's name, else ''."""
    for extension in CAPTION_EXTENSIONS:
        file = Path(path).with_suffix(extension)
        if file.is_file():
            try:
                return file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(f"Caption file {file} is not UTF-8 text ({error}).") from None
    found = kohya_folder(path, root)
    return found[1] if found else ""


def vary_tags(caption: str, rng: np.random.Generator, keep_tokens: int = 0, shuffle: bool = False,
              tag_dropout: float = 0.0) -> str:
    """Keep the first `keep_tokens` tags, drop each other tag with `tag_dropout`, shuffle the others."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(kept + rest)


@dataclass
class CaptionVariation:
    """Token ids of each micro-batch's captions, varied per stream position (see the module docstring)."""

    captions: Sequence[str]  # by dataset index
    tokenizer: object
    seed: int
    keep_tokens: int = 0
    shuffle: bool = False
    tag_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.tag_dropout < 1:
            raise ValueError(f"--caption_tag_dropout_rate must be in [0, 1), got {self.tag_dropout}.")
        if self.keep_tokens < 0:
            raise ValueError(f"--keep_tokens must be >= 0, got {self.keep_tokens}.")

    @property
    def active(self) -> bool:
        return self.shuffle or self.tag_dropout > 0

    def text(self, index: int, position: int) -> str:
        return self.text_of(self.captions[index], position)

    def text_of(self, caption: str, position: int) -> str:
        """`caption` as varied at stream `position`."""
        if not self.active:
            return caption
        rng = np.random.default_rng((self.seed, position, CAPTION_STREAM))
        return vary_tags(caption, rng, self.keep_tokens, self.shuffle, self.tag_dropout)

    def ids(self, index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        from training.data import tokenize

        texts = [self.text(i, p) for i, p in zip(index.tolist(), position.tolist())]
        return tokenize(self.tokenizer, texts)
