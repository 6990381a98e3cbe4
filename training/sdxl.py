"""SDXL's conditioning in training (Podell et al. 2023, SDXL, Sec. 2.1-2.2), as diffusers'
`examples/text_to_image/train_text_to_image_sdxl.py` builds it and `ldm_pipeline.sdxl` samples with it:

* a caption is tokenized by both tokenizers: (B, 2, L) ids (`data.tokenize` with the tokenizer pair);
* `encoder_hidden_states` = the penultimate hidden states of `text_encoder` (CLIP ViT-L) and
  `text_encoder_2` (OpenCLIP bigG, with projection) concatenated on the feature axis;
  `text_embeds` = text_encoder_2's pooled, projected embedding;
* `time_ids` = original size (h, w) + crop top-left (top, left) + target size (h, w) of each sample,
  as the data pipeline recorded them (`data.SIZE_KEYS`; with buckets the target is the bucket);
* caption dropout encodes the empty caption (not zeros), as diffusers' script does.

With frozen text encoders and `--cache_latents`, each distinct caption (and the empty one) is encoded
once into `output_dir/cache/` and the loss indexes that table: the "ids" of a sample are then its row.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_pipeline.atomic import atomic_file
from training import data

logger = logging.getLogger(__name__)
ENCODE_BATCH = 64  # captions per text-encoder call when filling the cache


class TextConditioning(abc.ABC):
    """ids -> (encoder_hidden_states (B, L, D), pooled text embedding (B, P)) for SDXL's UNet."""

    @abc.abstractmethod
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning of a micro-batch's captions."""


@dataclass
class SDXLTextEncoders(TextConditioning):
    """Both encoders run on (B, 2, L) token ids; either may be trained (and DDP-wrapped)."""

    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_1 = self.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
        out_2 = self.text_encoder_2(ids[:, 1], output_hidden_states=True)
        return torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1), out_2[0]


@dataclass
class CachedTextEmbeddings(TextConditioning):
    """Precomputed conditioning of frozen encoders; the "ids" are rows of the table."""

    hidden: torch.Tensor  # (U, L, D)
    pooled: torch.Tensor  # (U, P)

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = rows.cpu()
        return self.hidden[index].to(rows.device), self.pooled[index].to(rows.device)


def added_conditioning(pooled: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs`: pooled text and the per-sample size time ids (B, 6)."""
    time_ids = torch.cat([batch[key] for key in data.SIZE_KEYS], dim=1)
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}


def freeze_unused_layers(text_encoder: torch.nn.Module) -> None:
    """SDXL reads text_encoder's penultimate layer and never its pooled output, so its last layer and final
    norm get no gradient; frozen, so DDP does not wait for them (and nothing else changes)."""
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5's CLIPTextModel has no text_model
    for module in (model.encoder.layers[-1], model.final_layer_norm):
        module.requires_grad_(False)


def check_fits(unet, text_encoder_2, path: str) -> None:
    """The UNet's added-conditioning input matches the pooled width and six time ids (SDXL's layout)."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        raise ValueError(f"{path}: the UNet has no `text_time` added conditioning, so this is not an SDXL model.")
    expected = config.projection_class_embeddings_input_dim
    got = 6 * config.addition_time_embed_dim + text_encoder_2.config.projection_dim
    if expected != got:
        raise ValueError(f"{path}: the UNet expects {expected} added-conditioning features but six time ids and "
                         f"text_encoder_2's pooled embedding give {got}; the components come from different models.")


def check_options(config) -> None:
    """What SDXL training does not do (yet), with the fix."""
    if config.textual_inversion.placeholder_token:
        raise ValueError("--placeholder_token: textual inversion trains one text encoder's embedding table; SDXL "
                         "needs a vector for each of its two encoders, which is not supported. Use --lora_rank.")


# ---------------------------------------------------------------- the embedding cache


@torch.no_grad()
def encode_captions(encoders: SDXLTextEncoders, tokenizers: tuple, captions: list[str], device) -> dict:
    """{'hidden': (U, L, D), 'pooled': (U, P)} of some captions, in batches."""
    hidden, pooled = [], []
    for start in range(0, len(captions), ENCODE_BATCH):
        ids = data.tokenize(tokenizers, captions[start : start + ENCODE_BATCH]).to(device)
        h, p = encoders(ids)
        hidden.append(h.float().cpu())
        pooled.append(p.float().cpu())
    return {"hidden": torch.cat(hidden).contiguous(), "pooled": torch.cat(pooled).contiguous()}


def text_embedding_cache(accelerator, components, captions: list[str], cache_dir: Path):
    """(CachedTextEmbeddings, row of each caption, row of the empty caption): encoded once by the main process
    into a safetensors file named by what determines it, then loaded by every process."""
    unique = sorted(set(captions) | {""})
    encoders = (components.text_encoder, components.text_encoder_2)
    key = data.cache_key({"captions": unique, "tokenizers": [len(t) for t in components.tokenizers],
                          "weights": [float(sum(p.detach().double().sum() for p in e.parameters())) for e in encoders]})
    path = Path(cache_dir) / f"text-embeddings-{key}.safetensors"
    if accelerator.is_main_process and not path.is_file():
        logger.info("Encoding %d distinct captions with both text encoders into %s ...", len(unique), path)
        tensors = encode_captions(SDXLTextEncoders(*encoders), components.tokenizers, unique, accelerator.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp))
    accelerator.wait_for_everyone()
    tensors = load_file(str(path))
    row = {caption: i for i, caption in enumerate(unique)}
    rows = torch.tensor([row[c] for c in captions], dtype=torch.long)
    return CachedTextEmbeddings(tensors["hidden"], tensors["pooled"]), rows, torch.tensor(row[""])
