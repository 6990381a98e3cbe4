"""AUTOMATIC1111's prompt emphasis: `(word)`, `((word))`, `[word]`, `(word:1.5)`, `\\(` and `BREAK`.

The syntax, as A1111's wiki ("Attention/emphasis") documents it:

* `(text)` multiplies the attention to `text` by 1.1, `[text]` divides it by 1.1; they nest
  (`((text))` is 1.21) and an unclosed bracket applies to the rest of the prompt;
* `(text:1.5)` multiplies by 1.5 (any number, also below 1);
* `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; an unmatched `)` or `]` is text;
* `BREAK` (upper case, a word of its own) ends the current 75-token window: what follows starts a
  new one.

`parse_attention(text)` gives `[(fragment, weight)]` with runs of equal weight merged and
`BREAK` as `(BREAK, None)`; `weighted_windows` tokenises each fragment and cuts the tokens into
75-token windows with one weight per token. `apply_emphasis` is A1111's "Original" emphasis:
scale each token's hidden state by its weight, then rescale the window so that its mean is the
unweighted one; "No norm" skips the rescaling; "off" reads the prompt as plain text.
"""

from __future__ import annotations

import re

import torch

BREAK = "BREAK"
EMPHASIS_MODES = ("original", "no_norm", "off")
ROUND, SQUARE = 1.1, 1 / 1.1  # the multipliers of ( ) and [ ]

# escapes, brackets, an explicit weight `:1.5)`, plain text, and a lone colon (A1111's prompt_parser)
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float | None]]:
    """[(fragment, weight)] of a prompt; weight None marks a BREAK. Runs of equal weight are merged."""
    pieces: list[list] = []  # [fragment, weight]; weights of open brackets are multiplied in when they close
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([":
            (open_round if token == "(" else open_square).append(len(pieces))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        else:
            pieces.extend(_split_breaks(token))
    for start in open_round:
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    return _merge_equal_weights(pieces or [["", 1.0]])


def _split_breaks(text: str) -> list[list]:
    parts = _BREAK.split(text)
    pieces = [[parts[0], 1.0]]
    for part in parts[1:]:
        pieces += [[BREAK, None], [part, 1.0]]
    return pieces


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float | None]]:
    merged: list[list] = []
    for fragment, weight in pieces:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged]


def weighted_windows(tokenizer, text: str, emphasis: str = "original") -> list[tuple[list[int], list[float]]]:
    """(token ids, weights) per window of `model_max_length - 2` tokens; at least one window.

    With emphasis "off" the prompt is plain text (brackets and BREAK are tokens like any other)."""
    width = tokenizer.model_max_length - 2
    fragments = [(text, 1.0)] if emphasis == "off" else parse_attention(text)
    windows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for fragment, weight in fragments:
        if weight is None:  # BREAK: close the window, even an empty one
            windows.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids:
            if len(ids) == width:
                windows.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not windows:
        windows.append((ids, weights))
    return windows


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """Emphasis on one window's hidden states [77, dim] with per-position weights [77].

    "original": z = h * w, then z * mean(h) / mean(z) (A1111's EmphasisOriginal); "no_norm": h * w.
    A window whose weights are all 1 is returned unchanged."""
    if mode == "off" or bool((weights == 1).all()):
        return hidden
    weighted = hidden * weights.to(hidden.dtype)[:, None]
    if mode == "no_norm":
        return weighted
    return weighted * (hidden.mean() / weighted.mean())


def check_emphasis(mode) -> str | None:
    """The problem with an emphasis mode, or None."""
    if mode in EMPHASIS_MODES:
        return None
    return f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {mode!r}."
