"""A1111 prompt editing and alternation: a prompt -> which text conditions which sampler step.

`[from:to:when]` uses `from` until step `when` and `to` after it; `[to:when]` adds text, `[from::when]`
removes it; `when` below 1 is a fraction of the steps. `[a|b|c]` cycles a, b, c step by step. Edits nest;
brackets the grammar cannot read leave the whole prompt literal, and emphasis stays in the text for
`prompt_weights`. The result matches AUTOMATIC1111's `get_learned_conditioning_prompt_schedules`
(stable-diffusion-webui modules/prompt_parser.py; tests/test_prompt_schedule.py holds its examples):
a list of (end_step, text); sampler step i (0-based) uses the first entry with i <= end_step, as its
`reconstruct_cond_batch` does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import lark

# The same language as A1111's grammar: stray brackets/colons are text at the top level only.
_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER "]"
alternate: "[" prompt ("|" prompt)+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@functools.cache
def _parser() -> lark.Lark:
    return lark.Lark(_GRAMMAR)


def _edit_step(tree: lark.Tree, steps: int) -> int:
    """A `scheduled` node's switch step: a number < 1 is a fraction of the steps; capped at `steps`."""
    when = float(tree.children[-1])
    return min(steps, int(when * steps if when < 1 else when))


def _boundaries(tree: lark.Tree, steps: int) -> list[int]:
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            ends.add(_edit_step(node, steps))
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return sorted(ends)


def _text_at(node, step: int, steps: int) -> Iterator[str]:
    """The prompt's text at `step`: each edit takes its side, each alternation its turn."""
    if isinstance(node, lark.Token):
        yield node.value
        return
    if node.data == "scheduled":
        before, after = node.children[0], node.children[1]
        chosen = before if step <= _edit_step(node, steps) else after
        children = [] if chosen is None else [chosen]
    elif node.data == "alternate":
        children = [node.children[(step - 1) % len(node.children)]]
    else:
        children = node.children
    for child in children:
        if child is not None:
            yield from _text_at(child, step, steps)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_step, text), ...] for `steps` sampler steps; [(steps, prompt)] when nothing is scheduled."""
    if "[" not in prompt:  # no edit or alternation can start: the parse would give the text back (~30 ms saved)
        return [(steps, prompt)]
    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:  # unbalanced or malformed: literal text, as A1111
        return [(steps, prompt)]
    return [(end, "".join(_text_at(tree, end, steps))) for end in _boundaries(tree, steps)]


def prompt_schedules(prompts: list[str], steps: int) -> list[list[tuple[int, str]]]:
    cache = {p: prompt_schedule(p, steps) for p in set(prompts)}
    return [cache[p] for p in prompts]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text conditioning sampler step `step` (0-based): the first entry ending at or after it."""
    return next((text for end, text in schedule if step <= end), schedule[0][1])


def is_scheduled(schedules: list[list[tuple[int, str]]], prompts: list[str]) -> bool:
    """Whether any prompt changes over the steps (or reads differently from how it was typed)."""
    return any(s != [(s[-1][0], p)] for s, p in zip(schedules, prompts))
