"""Prompt encoding: stock equality for short prompts, chunking for long ones (no silent truncation)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm_pipeline.prompts import count_tokens, encode_pair, encode_prompts, token_windows
from training.tiny_models import tiny_sd_components

WORDS = "a red circle on a blue background at the top left".split()


@pytest.fixture(scope="module")
def components():
    return tiny_sd_components()


def long_prompt(n_tokens: int, tail: str = "red") -> str:
    words = (WORDS * 20)[: n_tokens - 50] + [tail] * 50
    return " ".join(words)


def test_short_prompt_equals_stock_encoding(components):
    stock = StableDiffusionPipeline(**components, requires_safety_checker=False)
    cond, uncond = stock.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True, ["", "dark"])
    ours = encode_pair(components["text_encoder"], components["tokenizer"], ["a red circle", "a blue square"],
                       ["", "dark"], with_uncond=True)
    torch.testing.assert_close(ours.cond, cond)
    torch.testing.assert_close(ours.uncond, uncond)


def test_150_token_prompt_is_not_truncated(components):
    tok, enc = components["tokenizer"], components["text_encoder"]
    a, b = long_prompt(150, "red"), long_prompt(150, "blue")
    assert count_tokens(tok, a) == 150 and len(token_windows(tok, a)) == 2
    ea, eb = encode_prompts(enc, tok, [a]), encode_prompts(enc, tok, [b])
    assert ea.shape == (1, 154, 32)  # two windows of 77
    # the prompts differ only after token 100: the first window is identical, the second is not
    torch.testing.assert_close(ea[:, :77], eb[:, :77])
    assert (ea[:, 77:] - eb[:, 77:]).abs().max() > 1e-3
    # what truncation would have given: identical embeddings
    ids = tok([a, b], padding="max_length", truncation=True, return_tensors="pt").input_ids
    truncated = enc(ids)[0]
    torch.testing.assert_close(truncated[0], truncated[1])


def test_negative_prompt_padded_to_the_same_windows(components):
    tok, enc = components["tokenizer"], components["text_encoder"]
    e = encode_pair(enc, tok, [long_prompt(150)], ["dark"], with_uncond=True)
    assert e.cond.shape == e.uncond.shape == (1, 154, 32)
    empty = encode_prompts(enc, tok, [""])
    torch.testing.assert_close(e.uncond[:, 77:], empty)  # the padding window is the empty prompt's


def test_long_prompt_changes_the_image(components):
    from ldm_pipeline import LatentTextToImagePipeline

    pipe = LatentTextToImagePipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    small = {"width": 32, "height": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "np", "seed": 1}
    a = pipe(long_prompt(150, "red"), **small).images
    b = pipe(long_prompt(150, "blue"), **small).images
    assert abs(a - b).max() > 1e-4


def test_mismatched_negative_count_is_an_error(components):
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        encode_pair(components["text_encoder"], components["tokenizer"], ["a", "b", "c"], ["x", "y"], with_uncond=True)
