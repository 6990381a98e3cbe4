"""Attention as one onnxruntime `MultiHeadAttention` node in the ONNX export, instead of MatMul-Softmax-MatMul.

torch.onnx's TorchScript exporter writes `scaled_dot_product_attention` as separate MatMul, Softmax and
MatMul nodes, so onnxruntime materialises every [batch, heads, queries, keys] score matrix; at 256x256
(1,024 latent tokens) MatMul and Softmax were about three quarters of the UNet's time on the CPU and the
scores of a batch of 16 rows are hundreds of MB. onnxruntime's contrib op `com.microsoft.MultiHeadAttention`
(https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MultiHeadAttention)
computes softmax(Q K^T * scale) V in one kernel. `multi_head_attention_export()`
routes, for the duration of an export and only while tracing, every unmasked, non-causal
`torch.nn.functional.scaled_dot_product_attention` call (the UNet's and the VAE's, through diffusers'
`AttnProcessor2_0`) through an autograd Function whose ONNX symbolic is that node (the head count, a
static attribute of the node, comes from the traced tensor; the exporter's own symbolic sees no static
shapes there); masked or causal ones (CLIP's text encoder) and every call outside a trace run torch's own.

onnxruntime's offline optimizer (`onnxruntime.transformers.optimizer`, model_type "unet") fuses the same
pattern, but on the CPU it needs most of its UNet fusions switched off (NhwcConv, GroupNorm, BiasSplitGelu and
packed QKV are GPU kernels), takes ~15 s of CPU on a tiny UNet, fails on numpy 2
(`int()` of a 1-element array in `FusionAttentionUnet.get_num_heads`, onnxruntime 1.32), and with that patched
was no faster than this node; writing the node at export costs nothing. Measured in docs/backend_speed.md.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

CONTRIB_DOMAIN = "com.microsoft"


class MultiHeadAttentionNode(torch.autograd.Function):
    """softmax(q k^T * scale) v on [batch, heads, tokens, head size] tensors; exported as one MultiHeadAttention."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int, scale: float | None):
        return STOCK_SDPA(query, key, value, scale=scale)

    @staticmethod
    def symbolic(g, query, key, value, heads: int, scale: float | None):
        def to_tokens(x):  # [batch, heads, tokens, size] -> [batch, tokens, heads * size], the node's layout
            x = g.op("Transpose", x, perm_i=[0, 2, 1, 3])
            return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([0, 0, -1])))

        scale_attribute = {} if scale is None else {"scale_f": float(scale)}
        out = g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", to_tokens(query), to_tokens(key), to_tokens(value),
                   num_heads_i=heads, **scale_attribute)
        out = g.op("Reshape", out, g.op("Constant", value_t=torch.tensor([0, 0, heads, -1])))
        return g.op("Transpose", out, perm_i=[0, 2, 1, 3])


STOCK_SDPA = F.scaled_dot_product_attention


def sdpa_for_export(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`scaled_dot_product_attention` as `multi_head_attention_export()` installs it."""
    plain = attn_mask is None and not is_causal and not enable_gqa and dropout_p == 0.0
    if plain and torch.jit.is_tracing() and query.dim() == 4 and query.shape[1] == key.shape[1] == value.shape[1]:
        return MultiHeadAttentionNode.apply(query, key, value, int(query.shape[1]), scale)
    return STOCK_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


@contextmanager
def multi_head_attention_export():
    """Within: torch.onnx.export writes attention as MultiHeadAttention nodes (and imports their domain, v1)."""
    F.scaled_dot_product_attention = sdpa_for_export
    try:
        yield
    finally:
        F.scaled_dot_product_attention = STOCK_SDPA
