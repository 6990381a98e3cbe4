"""A small word-level CLIP tokenizer built locally (no hub download).

CLIP's tokenizer is byte-pair encoding over characters. We write a vocabulary of
single characters plus one merge chain per known word (built from the end of the
word, so chains of different words never interfere), so every known word is a
single token and any other text still tokenizes (character by character).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARACTERS = sorted(set(string.ascii_lowercase + string.digits + ".,;:!?'\"-()/&"))


def _merge_chain(word: str) -> list[tuple[str, str]]:
    """The merges that join a word's characters right to left into one token ending in </w>.

    Every merge is (single character, suffix ending in </w>), so inside any word only its last
    two tokens can ever merge, and what they make is always a suffix of that word: merges of
    different words cannot interfere (a left-to-right chain breaks "green" once "re" is a merge).
    """
    merges = []
    suffix = word[-1] + "</w>"
    for char in reversed(word[:-1]):
        merges.append((char, suffix))
        suffix = char + suffix
    return merges


def write_vocabulary(words: list[str], directory: str | Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for `words` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in CHARACTERS:
        add(c)
    for c in CHARACTERS:
        add(c + "</w>")
    for word in dict.fromkeys(w.lower() for w in words):
        for a, b in _merge_chain(word):
            if (a, b) not in merges:
                merges.append((a, b))
            add(a + b)
    add(BOS)
    add(EOS)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_file, merges_file


def build_clip_tokenizer(words: list[str], directory: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds `words` as whole tokens; saved to `directory`."""
    vocab_file, merges_file = write_vocabulary(words, directory)
    tokenizer = CLIPTokenizer(
        str(vocab_file), str(merges_file), model_max_length=model_max_length,
        pad_token=EOS, bos_token=BOS, eos_token=EOS, unk_token=EOS,
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer
