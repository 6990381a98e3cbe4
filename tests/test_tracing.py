"""The traced UNet (`load_pipeline(trace=True)`): same outputs as eager, one graph per shape, eager fallbacks."""

from __future__ import annotations

import pytest
import torch

from ldm_pipeline import load_pipeline
from ldm_pipeline.tracing import TracedUNet
from training.tiny_models import tiny_unet


def _inputs(batch: int = 2, size: int = 8, tokens: int = 7):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, tokens, 32, generator=g)


@torch.no_grad()
def test_traced_unet_matches_eager_for_scalar_and_batched_timesteps():
    unet = tiny_unet()
    traced = TracedUNet(unet)
    x, context = _inputs()
    for t in (torch.tensor(999), torch.tensor([10, 500]), 250):
        expected = unet(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(traced(x, t, encoder_hidden_states=context).sample, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced(x, t, context, return_dict=False)[0], expected, atol=1e-5, rtol=1e-5)
    assert len(traced.traced_shapes) == 1  # every timestep form maps onto one (batch,) float graph
    assert traced.config.in_channels == 4 and traced.dtype == torch.float32


@torch.no_grad()
def test_a_new_shape_gets_its_own_graph_and_old_graphs_are_evicted():
    traced = TracedUNet(tiny_unet(), max_graphs=2)
    for batch, size in ((1, 8), (2, 8), (2, 16)):
        x, context = _inputs(batch, size)
        torch.testing.assert_close(traced(x, 5, context).sample, traced.unet(x, 5, context).sample, atol=1e-5, rtol=1e-5)
    assert [key[0] for key in traced.traced_shapes] == [(2, 4, 8, 8), (2, 4, 16, 16)]


def test_gradients_and_extra_arguments_run_the_eager_unet():
    traced = TracedUNet(tiny_unet())
    x, context = _inputs()
    out = traced(x, 5, context).sample  # gradients on: eager, differentiable
    assert out.requires_grad
    with torch.no_grad():
        traced(x, 5, context, cross_attention_kwargs={"scale": 1.0})
    assert traced.traced_shapes == []


@torch.no_grad()
def test_clear_retraces_after_the_weights_change():
    traced = TracedUNet(tiny_unet())
    x, context = _inputs()
    before = traced(x, 5, context).sample
    traced.unet.conv_out.bias.add_(1.0)
    traced.clear()
    assert traced.traced_shapes == []
    torch.testing.assert_close(traced(x, 5, context).sample, before + 1.0, atol=1e-5, rtol=1e-5)


def test_load_pipeline_trace_generates_the_same_image(tiny_model_dir):
    options = {"width": 32, "height": 32, "num_inference_steps": 3, "guidance_scale": 3.0, "progress_bar": False,
               "output_type": "np", "seed": 3}
    eager, traced = load_pipeline(tiny_model_dir, device="cpu"), load_pipeline(tiny_model_dir, device="cpu", trace=True)
    assert isinstance(traced.unet, TracedUNet)
    assert abs(eager("a red circle", **options).images - traced("a red circle", **options).images).max() < 1e-4
    with pytest.raises(ValueError, match="choose one"):
        load_pipeline(tiny_model_dir, device="cpu", trace=True, compile=True)
