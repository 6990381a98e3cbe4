"""Stock diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs) -> dict` on our loop.

Called after each step (after the inpainting blend, as stock), with the tensors named in
`callback_on_step_end_tensor_inputs` (default ``["latents"]``; a `PipelineCallback` /
`MultiPipelineCallbacks` object names its own `tensor_inputs`, as stock). A tensor the callback
returns replaces the one the loop holds:

* ``latents``: the current latents;
* ``prompt_embeds`` / ``negative_prompt_embeds``: the conditional / unconditional text embeddings,
  one row per image. Unlike stock, ``prompt_embeds`` is never the CFG-concatenated
  ``[negative; positive]`` batch: our guidance may skip the unconditional pass on some steps.

Our own `callback(StepInfo)` (progress, cancelling) runs after it and sees the replaced latents.
Setting `pipe._interrupt = True` stops the loop after that step and decodes the latents so far, as stock.
A callback that returned a different tensor is remembered (`altered`): the image's recipe then
says so, since the recipe cannot replay arbitrary code. In-place edits of the passed tensors are
not detected.

diffusers' CFG cut-off callbacks work by setting the pipeline's private `_guidance_scale`, which our
guidance does not read; they are refused in favour of `guidance_interval`, which does the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from diffusers import callbacks as stock_callbacks

TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
CFG_CUTOFF = tuple(getattr(stock_callbacks, name) for name in (
    "SDCFGCutoffCallback", "SDXLCFGCutoffCallback", "SDXLControlnetCFGCutoffCallback", "SD3CFGCutoffCallback")
    if hasattr(stock_callbacks, name))


def tensor_inputs_of(callback, requested) -> tuple[str, ...]:
    """The tensors the callback receives: a stock callback object's own `tensor_inputs`, else the requested ones."""
    if isinstance(callback, (stock_callbacks.PipelineCallback, stock_callbacks.MultiPipelineCallbacks)):
        return tuple(callback.tensor_inputs)
    return tuple(requested)


def callback_problems(callback, requested) -> list[str]:
    """What is wrong with `callback_on_step_end` / `callback_on_step_end_tensor_inputs` (empty when fine)."""
    if callback is None:
        return []
    if not callable(callback):
        return [f"callback_on_step_end must be callable (pipe, step, timestep, callback_kwargs) -> dict, "
                f"got {type(callback).__name__}."]
    cutoffs = [c for c in getattr(callback, "callbacks", [callback]) if isinstance(c, CFG_CUTOFF)]
    if cutoffs:
        return [f"{type(cutoffs[0]).__name__} switches guidance off through the pipeline's private _guidance_scale, "
                "which this pipeline does not read: use guidance_interval=(sigma_lo, sigma_hi) to limit guidance "
                "to a range of noise levels instead."]
    if isinstance(requested, str) or not all(isinstance(name, str) for name in requested):
        return [f"callback_on_step_end_tensor_inputs must be a list of names, got {requested!r}."]
    unknown = [name for name in tensor_inputs_of(callback, requested) if name not in TENSOR_INPUTS]
    if unknown:
        return [f"callback_on_step_end_tensor_inputs {', '.join(unknown)} do not exist in this pipeline; "
                f"available: {', '.join(TENSOR_INPUTS)}."]
    return []


@dataclass
class StepEndCallback:
    """One call's `callback_on_step_end`, applied to the loop's latents and `PromptEmbeddings`."""

    function: Callable
    tensor_inputs: tuple[str, ...] = ("latents",)
    altered: bool = field(default=False, init=False)  # did it ever return a tensor other than the one it got
    interrupted_after: int | None = field(default=None, init=False)  # the step after which it set `pipe._interrupt`

    @classmethod
    def of(cls, opts) -> "StepEndCallback | None":
        """The checked `GenerationOptions`' callback, or None when the call has none."""
        callback = opts.callback_on_step_end
        if callback is None:
            return None
        return cls(callback, tensor_inputs_of(callback, opts.callback_on_step_end_tensor_inputs))

    def __call__(self, pipe, i: int, t, latents, embeds):
        """(latents, embeds) after the callback of step i (0-based, as stock)."""
        given = {"latents": latents, "prompt_embeds": embeds.cond, "negative_prompt_embeds": embeds.uncond}
        returned = self.function(pipe, i, t, {name: given[name] for name in self.tensor_inputs}) or {}
        changed = {name: value for name, value in returned.items() if name in given and value is not given[name]}
        self.altered = self.altered or bool(changed)
        if pipe.interrupt:
            self.interrupted_after = i + 1
        if "prompt_embeds" in changed or "negative_prompt_embeds" in changed:
            embeds = replace(embeds, cond=changed.get("prompt_embeds", embeds.cond),
                             uncond=changed.get("negative_prompt_embeds", embeds.uncond), _batches={})
        return changed.get("latents", latents), embeds

    def describe(self) -> str:
        name = f"callable:{getattr(self.function, '__qualname__', type(self.function).__name__)}"
        return f"{name} (interrupted after step {self.interrupted_after})" if self.interrupted_after else name
