"""Fitting decomposed layers to the clip they were decomposed from.

A decomposition's layers are decoded from latents, so they composite into the VAE's rendering of
the scene, not into the user's clip: the toy VAE, for one, loses the background's texture. Once
the matte is known, matting recovers the foreground colour and the background from the observed
image through the compositing equation (LayerFlow eq. 1, I = alpha F + (1 - alpha) B; e.g.
Levin, Lischinski and Weiss 2008, closed-form matting, which reconstructs F and B after alpha).
:func:`fit_to_clip` does that per pixel, with the decomposition's own layers as the prior.
"""

from __future__ import annotations

import torch

__all__ = ["fit_to_clip"]


def fit_to_clip(clip: torch.Tensor, rgb: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor,
                prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground colour and background [F, 3, H, W] in [0, 1] that minimise, per pixel,

        |clip - alpha F - (1 - alpha) B|^2 + prior (|F - rgb|^2 + |B - background|^2)

    with the matte ``alpha`` [F, 1, H, W] fixed: the residual r of the decoded layers' composite
    goes to F in proportion to alpha / prior and to B to (1 - alpha) / prior (closed form:
    F = rgb + alpha r / (prior D), B = background + (1 - alpha) r / (prior D),
    D = 1 + (alpha^2 + (1 - alpha)^2) / prior). Where the matte is 0 the background becomes the clip, where it is 1
    the foreground does; behind an opaque foreground the background keeps the decomposition's
    inpainting. ``prior`` > 0: how much the decoded layers weigh against the clip (small: the
    layers composite into the clip almost exactly)."""
    if prior <= 0:
        raise ValueError(f"prior must be > 0; got {prior}.")
    clip, rgb, background, a = clip.float(), rgb.float(), background.float(), alpha.float()
    residual = clip - a * rgb - (1 - a) * background
    scaled = residual / (prior + a * a + (1 - a) ** 2)  # r / (prior D)
    return (rgb + a * scaled).clamp(0, 1), (background + (1 - a) * scaled).clamp(0, 1)
