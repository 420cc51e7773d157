"""Layer capacity: pad a variable number of layers to N with a validity flag (LayerAnimate
sec. 4.1 pads masks to N = 4 and marks padded layers invalid)."""

from __future__ import annotations

import torch

from layerkit.errors import LayerkitError


def pad_layers(layers: torch.Tensor, capacity: int, *, name: str = "layers") -> tuple[torch.Tensor, torch.Tensor]:
    """[n, ...] -> ([N, ...] zero-padded, validity [N] bool). More than N layers is an error."""
    n = layers.shape[0]
    if n > capacity:
        raise LayerkitError(f"{name} has {n} layers but the layer capacity is {capacity}; merge layers or raise the capacity.")
    if n == 0:
        raise LayerkitError(f"{name} has no layer; at least one is needed.")
    pad = torch.zeros((capacity - n, *layers.shape[1:]), dtype=layers.dtype, device=layers.device)
    validity = torch.arange(capacity, device=layers.device) < n
    return torch.cat([layers, pad]), validity


def check_frame_counts(videos: dict[str, torch.Tensor], frame_dim: int = 0) -> int | None:
    """All layers must have the same number of frames; returns it (None when there is no layer)."""
    counts = {name: v.shape[frame_dim] for name, v in videos.items() if v is not None}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise LayerkitError(f"the layers have different frame counts ({listed}); every layer needs the same number of frames.")
    return next(iter(counts.values()), None)
