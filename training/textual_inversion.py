"""Textual inversion (Gal et al. 2023): new tokens whose input embeddings are the only thing trained.

As diffusers' `examples/textual_inversion`: the placeholder ("<sks>", plus "<sks>_1" ...
for several vectors) is added to the tokenizer, the text encoder's embedding table grows,
the new rows start as the initializer token's embedding. Unlike the example, which restores
the old rows after every optimizer step, the old rows' gradients are masked to zero and the
table has no weight decay, so Adam-style optimizers leave them bit-identical (zero moments
give a zero update). Saved as `learned_embeds.safetensors` ({placeholder: (n, dim)},
`pipe.load_textual_inversion(folder)`) and as AUTOMATIC1111's `<name>.safetensors`
({"emb_params": (n, dim)}; the file name is the trigger word there).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_pipeline.atomic import atomic_directory

DIFFUSERS_FILE = "learned_embeds.safetensors"


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_placeholder(tokenizer, text_encoder, placeholder: str, initializer: str, num_vectors: int) -> list[int]:
    """Add the placeholder token(s), initialised from `initializer`; returns their ids."""
    tokens = placeholder_tokens(placeholder, num_vectors)
    known_word = len(tokenizer.tokenize(placeholder)) == 1  # it would take over a word of the vocabulary
    if known_word or tokenizer.add_tokens(tokens) != num_vectors:
        raise ValueError(f"--placeholder_token {placeholder!r} is already in the tokenizer; choose a new word.")
    initializer_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(initializer_ids) != 1:
        raise ValueError(f"--initializer_token {initializer!r} is {len(initializer_ids)} tokens; use a single-token word.")
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[initializer_ids[0]].clone()
    return ids


def train_only_rows(text_encoder, ids: list[int]) -> None:
    """Freeze the text encoder except its embedding table, whose gradient is masked to the rows `ids`."""
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    mask[ids] = 1
    weight.register_hook(lambda grad: grad * mask.to(grad))


def expand_placeholder(caption: str, placeholder: str, num_vectors: int) -> str:
    """'a <sks> dog' -> 'a <sks> <sks>_1 dog' for several vectors (as the diffusers example does)."""
    return caption.replace(placeholder, " ".join(placeholder_tokens(placeholder, num_vectors)))


def save_embeddings(directory: Path, text_encoder, placeholder: str, ids: list[int]) -> Path:
    """The learned vectors in diffusers' and AUTOMATIC1111's formats, written atomically."""
    vectors = text_encoder.get_input_embeddings().weight[ids].detach().float().clone().contiguous()
    name = placeholder.strip("<>") or "embedding"
    with atomic_directory(directory) as tmp:
        save_file({placeholder: vectors}, str(tmp / DIFFUSERS_FILE))
        save_file({"emb_params": vectors}, str(tmp / f"{name}.safetensors"))
    return directory


def setup(options, tokenizer, text_encoder, dataset) -> list[int]:
    """Add the placeholder to tokenizer and text encoder, expand it in the dataset's captions; the new ids."""
    ids = add_placeholder(tokenizer, text_encoder, options.placeholder_token, options.initializer_token,
                          options.num_vectors)
    expand = lambda sources: [replace(s, caption=expand_placeholder(s.caption, options.placeholder_token,
                                                                    options.num_vectors)) for s in sources]
    dataset.train, dataset.validation = expand(dataset.train), expand(dataset.validation)
    return ids
