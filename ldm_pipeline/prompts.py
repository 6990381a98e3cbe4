"""Prompt encoding: tokenise, split long prompts into windows, encode, concatenate.

CLIP sees at most `tokenizer.model_max_length` (77) tokens: BOS, 75 text tokens, EOS
and padding. A longer prompt is split into windows of 75 tokens, each window is
framed as `BOS tokens EOS pad...` and encoded on its own, and the windows' hidden
states are concatenated along the sequence axis, as AUTOMATIC1111's web UI does; the
UNet's cross-attention takes any sequence length. Nothing is truncated. A prompt of
<= 75 tokens gives exactly the embedding stock diffusers gives.

Positive and negative prompts of a batch are padded with empty windows to the same
number of windows, so they stack into one tensor.

A1111's emphasis syntax (`(word)`, `[word]`, `(word:1.5)`, `BREAK`; see `prompt_weights`) is
read by default (`emphasis="original"`); a prompt without it encodes exactly as before.

`clip_skip` follows diffusers: None or 0 uses the last layer, 1 the penultimate
layer (AUTOMATIC1111's "Clip skip: 2"), and so on; the skipped output still goes
through the final layer norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ldm_pipeline.prompt_weights import apply_emphasis, weighted_windows


@dataclass
class PromptEmbeddings:
    """cond and uncond hidden states, both [batch, 77 * windows, dim]; uncond may be None."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    # SDXL's added conditioning (`text_embeds`, `time_ids`), one row per prompt; None for SD 1.x / 2.x
    cond_added: dict | None = None
    uncond_added: dict | None = None
    _batches: dict = field(default_factory=dict, repr=False, compare=False)

    def pair(self) -> torch.Tensor:
        """[uncond; cond] for one batched UNet call (the order stock diffusers uses)."""
        return self.batched(("uncond", "cond"))[0]

    def batched(self, passes: tuple[str, ...]) -> tuple[torch.Tensor, dict | None]:
        """(hidden states, added conditioning) for one UNet call over `passes`, stacked in that order:
        "uncond" takes the negative prompt, "cond" and "perturbed" (PAG) the prompt; built once per order."""
        if passes not in self._batches:
            def stack(cond, uncond):
                return torch.cat([uncond if p == "uncond" else cond for p in passes])

            def stack_added(cond, uncond):  # a list (IP-Adapter `image_embeds`) is stacked per adapter
                if isinstance(cond, list):
                    return [stack(c, u) for c, u in zip(cond, uncond or [None] * len(cond))]
                return stack(cond, uncond)

            uncond_added = self.uncond_added or {}
            added = None if self.cond_added is None else {
                k: stack_added(v, uncond_added.get(k)) for k, v in self.cond_added.items()}
            self._batches[passes] = (stack(self.cond, self.uncond), added)
        return self._batches[passes]

    def with_added(self, cond: dict, uncond: dict | None) -> "PromptEmbeddings":
        """These embeddings with more added conditioning (e.g. IP-Adapter `image_embeds`), one row per image."""
        return PromptEmbeddings(self.cond, self.uncond, {**(self.cond_added or {}), **cond},
                                None if uncond is None else {**(self.uncond_added or {}), **uncond})

    def repeat_each(self, n: int) -> "PromptEmbeddings":
        """Each prompt's embedding n times in a row (prompt-major image order)."""
        def rep(x):
            if isinstance(x, dict):
                return {k: v.repeat_interleave(n, dim=0) for k, v in x.items()}
            return None if x is None else x.repeat_interleave(n, dim=0)
        return PromptEmbeddings(rep(self.cond), rep(self.uncond), rep(self.cond_added), rep(self.uncond_added))


def as_prompt_list(prompt: str | list[str] | None, name: str = "prompt") -> list[str]:
    if prompt is None:
        return []
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must be a string or a list of strings, got {type(bad[0]).__name__}.")
    return prompts


def token_windows(tokenizer, text: str, emphasis: str = "original") -> list[list[int]]:
    """The prompt's token ids (no BOS/EOS) in windows of model_max_length - 2; at least one window."""
    return [ids for ids, _ in weighted_windows(tokenizer, text, emphasis)]


def frame_window(tokenizer, window: list[int]) -> list[int]:
    """BOS + window + EOS, padded with the pad token to model_max_length (as `padding="max_length"`)."""
    ids = [tokenizer.bos_token_id, *window, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))


def count_tokens(tokenizer, text: str) -> int:
    """Number of text tokens (without BOS/EOS): what a UI shows as `n / 75`."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)


def _encode_ids(text_encoder, ids: torch.Tensor, lengths: list[int], clip_skip: int | None) -> torch.Tensor:
    """Hidden states of a batch of framed windows [n, 77] -> [n, 77, dim].

    Only encoders configured with `use_attention_mask` get a padding mask, as in stock diffusers."""
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < torch.tensor(lengths, device=ids.device)[:, None]).long()
    if not clip_skip:
        return text_encoder(ids, attention_mask=mask)[0]
    hidden = text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    if clip_skip >= len(hidden):
        raise ValueError(f"clip_skip={clip_skip} but the text encoder has only {len(hidden) - 1} layers.")
    # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden[-(clip_skip + 1)])


def frame_weights(tokenizer, weights: list[float]) -> list[float]:
    """A window's token weights with 1.0 for BOS, EOS and padding (aligned with `frame_window`)."""
    return [1.0, *weights] + [1.0] * (tokenizer.model_max_length - 1 - len(weights))


def encode_prompts(
    text_encoder, tokenizer, prompts: list[str], *, windows: int | None = None, clip_skip: int | None = None,
    emphasis: str = "original",
) -> torch.Tensor:
    """[len(prompts), 77 * windows, dim]; `windows` pads every prompt to that many windows."""
    per_prompt = [weighted_windows(tokenizer, p, emphasis) for p in prompts]
    windows = windows or max(len(w) for w in per_prompt)
    padded = [w for ws in per_prompt for w in ws + [([], [])] * (windows - len(ws))]
    ids = torch.tensor([frame_window(tokenizer, w) for w, _ in padded], dtype=torch.long, device=text_encoder.device)
    hidden = _encode_ids(text_encoder, ids, [len(w) + 2 for w, _ in padded], clip_skip)
    weights = torch.tensor([frame_weights(tokenizer, ws) for _, ws in padded], device=hidden.device)
    hidden = torch.stack([apply_emphasis(h, w, emphasis) for h, w in zip(hidden, weights)])
    return hidden.reshape(len(prompts), windows * hidden.shape[1], hidden.shape[2])


def window_count(tokenizer, prompts: list[str], emphasis: str = "original") -> int:
    return max(len(token_windows(tokenizer, p, emphasis)) for p in prompts)


@torch.no_grad()
def encode_pair(
    text_encoder, tokenizer, prompts: list[str], negative: list[str] | None, *, with_uncond: bool,
    clip_skip: int | None = None, emphasis: str = "original",
) -> PromptEmbeddings:
    """Embeddings of the prompts and (if `with_uncond`) of the negative prompts ("" when None)."""
    negative = negative if negative else [""] * len(prompts)
    if len(negative) == 1 and len(prompts) > 1:
        negative = negative * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"Got {len(negative)} negative prompts for {len(prompts)} prompts; give one or one each.")
    windows = window_count(tokenizer, prompts + (negative if with_uncond else []), emphasis)
    options = dict(windows=windows, clip_skip=clip_skip, emphasis=emphasis)
    cond = encode_prompts(text_encoder, tokenizer, prompts, **options)
    uncond = encode_prompts(text_encoder, tokenizer, negative, **options) if with_uncond else None
    return PromptEmbeddings(cond, uncond)


def pad_to_windows(embeds: torch.Tensor, empty_window: torch.Tensor, length: int) -> torch.Tensor:
    """Append copies of the empty-prompt window until the sequence is `length` long."""
    missing = (length - embeds.shape[1]) // empty_window.shape[1]
    if missing <= 0:
        return embeds
    extra = empty_window.expand(embeds.shape[0], -1, -1).repeat(1, missing, 1)
    return torch.cat([embeds, extra], dim=1)
