"""``example.frame_gain``: a learnable per-channel gain on the denoiser output.

The adapter multiplies the denoiser output by ``1 + scale * s * delta`` along the channel
axis, where ``delta`` is zero-initialised (the backbone is unchanged until it trains),
``scale`` is the adapter's global scale and ``s`` the per-sample scale the task may put in
``Packed.scales[<adapter name>]`` (read from the backbone's step context). It is installed as
a forward hook on ``backbone.denoiser`` and never touches the backbone's own weights, so
``detach`` (removing the hook) restores the backbone exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone


class FrameGainAdapter(Adapter):
    name = "example.frame_gain"

    def __init__(self, channels: int | None = None, channel_dim: int = 2, trainable: bool = True,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.channel_dim = int(channel_dim)
        self.trainable = bool(trainable)
        self.scale = float(scale)
        self.delta: nn.Parameter | None
        if channels is not None:
            self.delta = nn.Parameter(torch.zeros(int(channels)), requires_grad=self.trainable)
        else:  # created at attach, sized from the backbone's latent channels
            self.register_parameter("delta", None)
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    # -- install / remove ----------------------------------------------------------------
    def attach(self, backbone: Backbone) -> None:
        if self.attached:
            raise LayerkitError(f"adapter '{self.name}' is already attached.")
        if self.delta is None:
            param = next(backbone.denoiser.parameters(), None)
            self.delta = nn.Parameter(
                torch.zeros(int(backbone.latent_channels), device=param.device if param is not None else None),
                requires_grad=self.trainable,
            )
        context = backbone.context

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _map_output(output, lambda x: self._gain(x, context))

        self._handle = backbone.denoiser.register_forward_hook(hook)
        self.attached = True

    def detach(self, backbone: Backbone) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.attached = False

    # -- the change ------------------------------------------------------------------------
    def _gain(self, x: torch.Tensor, context: Any) -> torch.Tensor:
        assert self.delta is not None
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.delta.numel():
            raise LayerkitError(
                f"adapter '{self.name}' has {self.delta.numel()} channels but the denoiser output "
                f"{tuple(x.shape)} has {x.shape[dim]} on axis {self.channel_dim}; set channels or channel_dim."
            )
        shape = [1] * x.dim()
        shape[dim] = -1
        gain = self.delta.to(x.dtype).view(shape) * self.scale
        s = context.scale_for(self.name, x.shape[0], default=1.0) if context.active else 1.0
        if isinstance(s, torch.Tensor):
            gain = gain * s.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        elif s != 1.0:
            gain = gain * s
        return x + x * gain


def _map_output(output: Any, fn: Any) -> Any:
    """Apply ``fn`` to the main tensor of a module output (tensor, tuple or diffusers output)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        output.sample = fn(output.sample)
        return output
    raise LayerkitError(f"example.frame_gain cannot read a denoiser output of type {type(output).__name__}.")
