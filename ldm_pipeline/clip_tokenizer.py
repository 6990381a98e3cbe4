"""A model folder's CLIP tokenizer read with `tokenizers` alone, for the ONNX backend's cold start.

transformers' `CLIPTokenizer` (5.x) runs the folder's `tokenizer.json` through `tokenizers`; importing
transformers to get it costs about a second of a one-image command. `ClipTokenizerJson` loads the same
file into the same `tokenizers.Tokenizer` and offers what `ldm_pipeline.prompts` and `prompt_weights`
call: `tokenizer(text, add_special_tokens=...).input_ids`, `bos_token_id`, `eos_token_id`,
`pad_token_id` and `model_max_length`. Its ids are CLIPTokenizer's (`tests/test_cold_start.py`).
`load_tokenizer` falls back to transformers for a folder without `tokenizer.json` or with another class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


@dataclass
class Encoding:
    input_ids: list[int]


def _content(token) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


class ClipTokenizerJson:
    """The subset of `CLIPTokenizer` the pipeline uses, on `tokenizers.Tokenizer.from_file(tokenizer.json)`."""

    def __init__(self, folder: Path, config: dict):
        from tokenizers import Tokenizer

        self.folder = folder
        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.backend.no_truncation()
        self.backend.no_padding()
        self.model_max_length = int(config["model_max_length"])
        for name in SPECIAL_TOKENS:
            token_id = self.backend.token_to_id(_content(config[name]))
            if token_id is None:
                raise ValueError(f"{folder}: {name} {config[name]!r} is not in tokenizer.json")
            setattr(self, f"{name}_id", token_id)

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
                 verbose: bool = False) -> Encoding:
        """One text's ids, never truncated (`truncation` and `verbose` as CLIPTokenizer takes them)."""
        if truncation:
            raise ValueError("ClipTokenizerJson does not truncate; the pipeline splits long prompts into windows.")
        return Encoding(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def reads_without_transformers(folder: Path, class_name: str) -> dict | None:
    """The folder's tokenizer_config.json when `ClipTokenizerJson` can stand in for `class_name`, else None."""
    config_file = folder / "tokenizer_config.json"
    if class_name not in CLIP_CLASSES or not (folder / "tokenizer.json").is_file() or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    needed = ("model_max_length",) + SPECIAL_TOKENS
    return config if all(config.get(key) is not None for key in needed) else None


def load_tokenizer(folder: Path, library: str, class_name: str):
    """`ClipTokenizerJson` when it can stand in for the named class, else that class' `from_pretrained`."""
    config = reads_without_transformers(folder, class_name)
    if config is not None:
        return ClipTokenizerJson(folder, config)
    from importlib import import_module

    return getattr(import_module(library), class_name).from_pretrained(folder)
