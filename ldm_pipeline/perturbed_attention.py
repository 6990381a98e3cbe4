"""Perturbed-attention guidance (PAG, Ahn et al. 2024): the UNet's perturbed pass, through diffusers' processors.

The perturbed prediction is the conditional one with the chosen self-attention layers replaced by
identity attention (softmax(QK^T) -> I, so a layer outputs its values). diffusers' PAG processors do it
on the last chunk of the batch: `PAGCFGIdentitySelfAttnProcessor2_0` for [uncond; cond; perturbed],
`PAGIdentitySelfAttnProcessor2_0` for [cond; perturbed]. Layers are chosen as stock
`StableDiffusionPAGPipeline(pag_applied_layers=...)` chooses them (diffusers' `PAGMixin`): "mid",
"down_blocks.1", "up_blocks.0.attentions.0", or a regular expression over the UNet's module names.
While a run is under way the chosen layers carry the PAG processors; afterwards the UNet's own
processors are back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

DEFAULT_LAYERS = ("mid",)  # the paper's and stock diffusers' default


@dataclass(frozen=True)
class PerturbedAttention:
    """PAG's scale s (Ahn et al. 2024, eq. 11) and the self-attention layers of the perturbed pass."""

    scale: float
    layers: tuple[str, ...] = DEFAULT_LAYERS

    def describe(self) -> dict:
        return {"scale": self.scale, "layers": list(self.layers)}


class _PAGLayers:
    """What diffusers' `PAGMixin._set_pag_attn_processor` reads: the UNet and the two processors."""

    def __init__(self, unet, layers: tuple[str, ...]):
        from diffusers.models.attention_processor import (  # diffusers' models tree: on use only (cold start)
            PAGCFGIdentitySelfAttnProcessor2_0,
            PAGIdentitySelfAttnProcessor2_0,
        )

        self.unet = unet
        self.layers = list(layers)
        self._pag_attn_processors = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())
        self.with_uncond = None

    def select(self, with_uncond: bool) -> None:
        """The processors for a [uncond; cond; perturbed] batch (with_uncond) or a [cond; perturbed] one."""
        if with_uncond != self.with_uncond:
            from diffusers.pipelines.pag.pag_utils import PAGMixin

            PAGMixin._set_pag_attn_processor(self, self.layers, with_uncond)
            self.with_uncond = with_uncond


def eager_unet(unet):
    """The module whose attention processors run: a traced UNet's eager one (a frozen graph keeps its own)."""
    from ldm_pipeline.tracing import TracedUNet

    if isinstance(unet, TracedUNet):
        return unet.unet
    if not hasattr(unet, "attn_processors"):
        raise ValueError(f"Perturbed-attention guidance (pag_scale) swaps attention processors inside the UNet, which "
                         f"{type(unet).__name__} does not expose: use the PyTorch backend.")
    return unet


@contextmanager
def perturbed_attention(unet, pag: PerturbedAttention | None):
    """Yields the PAG layers of a run (None without PAG); the UNet's own processors are restored afterwards."""
    if pag is None:
        yield None
        return
    model = eager_unet(unet)
    original = model.attn_processors
    layers = _PAGLayers(model, pag.layers)
    try:
        try:
            layers.select(True)  # fails before any step when a layer matches no self-attention module
        except ValueError as error:
            raise ValueError(f"pag_layers: {error}; name UNet self-attention layers as diffusers' PAG pipelines "
                             "do: 'mid', 'down_blocks.1', 'up_blocks.0.attentions.0' (or a regular expression).") from None
        yield layers
    finally:
        model.set_attn_processor(original)
