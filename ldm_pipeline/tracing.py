"""A UNet run through `torch.jit.trace` + `torch.jit.freeze`, one graph per input shape.

At the small sizes of the embedded default model (batch 2 x 4 x 16 x 16) a UNet call on the CPU
is mostly Python and per-module dispatch, not arithmetic; a frozen TorchScript graph removes it
(measured ~2x per call, `docs/default_model.md`). Each new (batch, latent size, prompt length,
dtype, device) costs one trace (about 1-2 s on the embedded model), so this pays off for a
long-lived pipeline (the web UI, batch generation), not for a single cold image.

`torch.jit.freeze` may fold weights into the graph: load LoRA or other weights *before* the first
call, or call `TracedUNet.clear()` after changing them. Calls that are not a plain
`unet(sample, t, context)` in inference mode (gradients on, cross_attention_kwargs, added
conditions, ...) run the eager UNet.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


class TracedUNet(torch.nn.Module):
    """Wraps a UNet2DConditionModel; same call signature and attributes (config, dtype, device, ...)."""

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 8):
        super().__init__()
        self.unet = unet.eval()
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    @property
    def traced_shapes(self) -> list[tuple]:
        return list(self._graphs)

    def clear(self) -> None:
        """Forget every graph (after the UNet's weights changed)."""
        with self._lock:
            self._graphs.clear()

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if args or any(v is not None for v in kwargs.values()) or torch.is_grad_enabled():
            return self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timesteps = self._timesteps(timestep, sample)
        out = self._graph(sample, timesteps, encoder_hidden_states)(sample, timesteps, encoder_hidden_states)["sample"]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    @staticmethod
    def _timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
        """A 1-D timestep tensor of the batch size (what the graph was traced with)."""
        t = torch.as_tensor(timestep, device=sample.device)
        if not t.is_floating_point():
            t = t.to(torch.float32)
        return t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t

    def _graph(self, sample, timesteps, context) -> torch.jit.ScriptModule:
        key = (tuple(sample.shape), sample.dtype, tuple(context.shape), context.dtype, timesteps.dtype, sample.device)
        with self._lock:
            if key in self._graphs:
                self._graphs.move_to_end(key)
                return self._graphs[key]
            with torch.no_grad(), warnings.catch_warnings():
                # diffusers' shape checks become trace-time constants (each graph is one shape), and
                # torch 2.x flags jit.freeze as deprecated in favour of torch.compile (minutes on CPU).
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(self.unet, (sample, timesteps, context), strict=False, check_trace=False)
                graph = torch.jit.freeze(traced.eval())
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            return graph
