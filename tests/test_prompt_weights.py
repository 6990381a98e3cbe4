"""A1111 prompt emphasis: the parse against A1111's documented examples, per-token weights and
embeddings against a reference written from A1111's algorithm, BREAK windows, and the pipeline."""

import math

import pytest
import torch

from ldm_pipeline import LatentTextToImagePipeline, metadata
from ldm_pipeline.prompt_weights import BREAK, parse_attention, weighted_windows
from ldm_pipeline.prompts import encode_prompts
from training.tiny_models import tiny_sd_components

# The examples in the docstring of A1111's modules/prompt_parser.py::parse_prompt_attention
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("unmatched) and ]", [("unmatched) and ]", 1.0)]),
    ("a: b", [("a: b", 1.0)]),
    ("(red:-0.5)", [("red", -0.5)]),
    ("a BREAK b", [("a", 1.0), (BREAK, None), ("b", 1.0)]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_parse_matches_a1111_documented_examples(text, expected):
    parsed = parse_attention(text)
    assert [f for f, _ in parsed] == [f for f, _ in expected]
    for (_, got), (_, want) in zip(parsed, expected):
        assert got == want if want is None else math.isclose(got, want, rel_tol=1e-12)


@pytest.fixture(scope="module")
def components():
    return tiny_sd_components()


def reference_embedding(encoder, tokenizer, fragments: list[tuple[str, float]]) -> torch.Tensor:
    """A1111's sd_hijack_clip for one window, written out: tokens of each fragment with its weight,
    BOS/EOS/padding weight 1; z = h * w; z *= mean(h) / mean(z) ("Original" emphasis)."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in fragments:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    ids += [tokenizer.eos_token_id]
    pad = tokenizer.model_max_length - len(ids)
    ids, weights = ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * (pad + 1)
    h = encoder(torch.tensor([ids]))[0]
    z = h * torch.tensor(weights)[None, :, None]
    return z * (h.mean() / z.mean())


@pytest.mark.parametrize("prompt, fragments", [
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("a ((large)) [blue] square", [("a ", 1.0), ("large", 1.21), (" ", 1.0), ("blue", 1 / 1.1), (" square", 1.0)]),
    ("(green circle:0.7) on a red background",
     [("green circle", 0.7), (" on a red background", 1.0)]),
])
def test_weighted_embedding_equals_a1111_reference(components, prompt, fragments):
    enc, tok = components["text_encoder"], components["tokenizer"]
    with torch.no_grad():
        ours = encode_prompts(enc, tok, [prompt])
        reference = reference_embedding(enc, tok, fragments)
    torch.testing.assert_close(ours, reference)
    plain = encode_prompts(enc, tok, ["".join(f for f, _ in fragments)])
    assert (ours - plain).abs().max() > 1e-4  # the weights did something


def test_no_emphasis_syntax_gives_exactly_the_plain_embedding(components):
    enc, tok = components["text_encoder"], components["tokenizer"]
    with torch.no_grad():
        on = encode_prompts(enc, tok, ["a large red circle on a blue background"])
        off = encode_prompts(enc, tok, ["a large red circle on a blue background"], emphasis="off")
    assert torch.equal(on, off)


def test_no_norm_skips_the_mean_restoration(components):
    enc, tok = components["text_encoder"], components["tokenizer"]
    with torch.no_grad():
        plain = encode_prompts(enc, tok, ["a red circle"])
        no_norm = encode_prompts(enc, tok, ["a (red:2) circle"], emphasis="no_norm")
    red = 2  # BOS, "a", "red"
    torch.testing.assert_close(no_norm[0, red], 2 * plain[0, red])
    torch.testing.assert_close(no_norm[0, :red], plain[0, :red])


def test_break_starts_a_new_window(components):
    enc, tok = components["text_encoder"], components["tokenizer"]
    windows = weighted_windows(tok, "a red circle BREAK on a blue background")
    assert [len(ids) for ids, _ in windows] == [3, 4]
    with torch.no_grad():
        both = encode_prompts(enc, tok, ["a red circle BREAK on a blue background"])
        first = encode_prompts(enc, tok, ["a red circle"])
        second = encode_prompts(enc, tok, ["on a blue background"])
    assert both.shape[1] == 2 * tok.model_max_length
    torch.testing.assert_close(both, torch.cat([first, second], dim=1))


def test_weights_follow_tokens_across_the_75_token_window(components):
    tok = components["tokenizer"]
    prompt = " ".join(["red"] * 74) + " (blue circle:1.3) square"
    windows = weighted_windows(tok, prompt)
    assert [len(ids) for ids, _ in windows] == [75, 2]
    assert windows[0][1][-1] == 1.3 and windows[1][1] == [1.3, 1.0]


@pytest.fixture(scope="module")
def pipe(components):
    return LatentTextToImagePipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                    "scheduler")})


SMALL = {"width": 32, "height": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "np", "seed": 3}


def test_pipeline_reads_emphasis_and_records_it(pipe):
    weighted = pipe("a (red:1.6) circle", **SMALL)
    plain = pipe("a red circle", **SMALL)
    literal = pipe("a (red:1.6) circle", emphasis="off", **SMALL)
    assert abs(weighted.images - plain.images).max() > 1e-4
    assert abs(literal.images - weighted.images).max() > 1e-4
    assert weighted.recipes[0]["emphasis"] == "original"
    # recipe -> options -> the same image, for each mode
    for out in (weighted, literal):
        again = pipe(**{**metadata.recipe_to_options(out.recipes[0]), "progress_bar": False, "output_type": "np"})
        assert (again.images == out.images).all()


def test_infotext_names_a_non_default_emphasis_as_a1111_does():
    recipe = {"prompt": "a (red) circle", "seed": 1, "steps": 2, "width": 64, "height": 64, "emphasis": "no_norm"}
    text = metadata.format_parameters(recipe)
    assert "Emphasis: No norm" in text
    assert metadata.parameters_to_options(metadata.parse_parameters(text))["emphasis"] == "no_norm"
    plain = metadata.format_parameters({**recipe, "emphasis": "original"})
    assert "Emphasis" not in plain  # A1111 writes nothing for its default
    assert "emphasis" not in metadata.parameters_to_options(metadata.parse_parameters(plain))  # the default


def test_unknown_emphasis_is_refused_by_name(pipe):
    with pytest.raises(ValueError, match="emphasis must be one of original, no_norm, off"):
        pipe("a red circle", emphasis="strong", **SMALL)
