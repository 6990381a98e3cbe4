"""Attention exported as onnxruntime's MultiHeadAttention node (`ldm_pipeline.onnx_attention`): the same numbers as
PyTorch at new shapes, masked and causal attention left to torch's decomposition, torch restored afterwards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")
onnx = pytest.importorskip("onnx", reason="the `onnx` extra is not installed")

from ldm_pipeline.onnx_attention import STOCK_SDPA, multi_head_attention_export  # noqa: E402


class SelfAndCrossAttention(torch.nn.Module):
    """Self-attention with the default scale, then cross-attention to a context of another length and an explicit
    scale, on [batch, heads, tokens, head size] tensors (how diffusers' AttnProcessor2_0 calls it)."""

    def __init__(self, heads: int = 3, size: int = 4, context_dim: int = 5):
        super().__init__()
        self.heads, self.size = heads, size
        self.qkv = torch.nn.Linear(heads * size, 3 * heads * size)
        self.kv = torch.nn.Linear(context_dim, 2 * heads * size)

    def split(self, x):
        return x.unflatten(-1, (self.heads, self.size)).transpose(1, 2)

    def forward(self, x, context, mask):
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v)
        ck, cv = (self.split(t) for t in self.kv(context).chunk(2, dim=-1))
        h = F.scaled_dot_product_attention(h, ck, cv, scale=0.3)
        masked = F.scaled_dot_product_attention(h, h, h, attn_mask=mask)
        causal = F.scaled_dot_product_attention(h, h, h, is_causal=True)
        return (h + masked + causal).transpose(1, 2).flatten(2)


def export(module, inputs, path, names, axes):
    with torch.no_grad(), multi_head_attention_export():
        torch.onnx.export(module.eval(), inputs, str(path), dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes=axes)
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_plain_attention_becomes_multi_head_attention_and_matches_pytorch_at_new_shapes(tmp_path):
    torch.manual_seed(0)
    module = SelfAndCrossAttention()

    def inputs(batch, tokens, context_tokens):
        return (torch.randn(batch, tokens, 12), torch.randn(batch, context_tokens, 5),
                torch.randn(batch, 1, tokens, tokens))

    axes = {"x": {0: "b", 1: "s"}, "context": {0: "b", 1: "c"}, "mask": {0: "b", 2: "s", 3: "s2"}}
    ops = export(module, inputs(2, 6, 7), tmp_path / "a.onnx", ["x", "context", "mask"], axes)
    assert ops["MultiHeadAttention"] == 2  # the self- and the cross-attention
    assert ops["Softmax"] == 2  # the masked and the causal ones: torch's own decomposition
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    for batch, tokens, context_tokens in ((1, 9, 3), (3, 16, 11)):
        x, context, mask = inputs(batch, tokens, context_tokens)
        (got,) = session.run(None, {"x": x.numpy(), "context": context.numpy(), "mask": mask.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), module(x, context, mask), atol=1e-5, rtol=1e-5)


def test_torch_is_restored_and_untraced_calls_are_stock_attention(tmp_path):
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    with multi_head_attention_export():
        assert F.scaled_dot_product_attention is not STOCK_SDPA
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), STOCK_SDPA(q, k, v), atol=0, rtol=0)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                   STOCK_SDPA(q, k, v, is_causal=True), atol=0, rtol=0)
    assert F.scaled_dot_product_attention is STOCK_SDPA
    with pytest.raises(RuntimeError), multi_head_attention_export():
        raise RuntimeError("an export that fails")
    assert F.scaled_dot_product_attention is STOCK_SDPA
