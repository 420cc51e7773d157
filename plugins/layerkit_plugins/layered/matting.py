"""Fitting the generated layers to the given ones through the compositing equation.

A conditional task's generated layers are decoded from latents, so they composite with the VAE's
rendering of the given layer, not with the layer the user gave: the toy VAE, for one, loses a
background's texture. Once the matte is known, matting recovers the foreground colour and the
background from the observed image through the compositing equation (LayerFlow eq. 1,
I = alpha F + (1 - alpha) B; e.g. Levin, Lischinski and Weiss 2008, closed-form matting, which
reconstructs F and B after alpha). :func:`fit_to_given` does that per pixel for whichever of I, F
and B were generated, the given ones held fixed and the generated ones' decoded values as the prior.
"""

from __future__ import annotations

import torch

__all__ = ["fit_to_given"]


def fit_to_given(layers: dict[str, torch.Tensor], alpha: torch.Tensor, given: set[str] | frozenset[str],
                 prior: float) -> dict[str, torch.Tensor]:
    """The generated ones of ``layers`` ("foreground": F, "background": B, "blended": I; [F, 3, H, W]
    in [0, 1]) that minimise, per pixel,

        |I - alpha F - (1 - alpha) B|^2 + prior * sum over the generated x of |x - x decoded|^2

    with the matte ``alpha`` [F, 1, H, W] and the ``given`` layers fixed. With r the residual of the
    decoded values and c_x the coefficient of x in it (c_I = 1, c_F = -alpha, c_B = alpha - 1), each
    generated x moves by -c_x r / (prior + sum over the generated x of c_x^2), then is clamped to
    [0, 1] (the unconstrained minimum, clamped). Decompose (I given): where the matte is 0 the
    background moves 1 / (1 + prior) of the way to the clip, where it is 1 the foreground does,
    behind an opaque foreground the background keeps the decomposition's inpainting; bg2fg (B
    given): where the matte is 0 the blended clip moves to the given background; fg2bg (F given):
    where it is 1, to the given foreground. ``prior`` > 0: how much the decoded layers weigh
    against the given ones. Returns the generated layers, fitted (the given ones are left out)."""
    if prior <= 0:
        raise ValueError(f"prior must be > 0; got {prior}.")
    names = ("foreground", "background", "blended")
    if set(given) - set(names) or not set(names) - set(given):
        raise ValueError(f"given must be a proper subset of {names}; got {sorted(given)}.")
    a = alpha.float()
    x = {n: layers[n].float() for n in names}
    residual = x["blended"] - a * x["foreground"] - (1 - a) * x["background"]
    coefficient = {"blended": torch.ones_like(a), "foreground": -a, "background": a - 1}
    fitted = [n for n in names if n not in given]
    scaled = residual / (prior + sum(coefficient[n] ** 2 for n in fitted))
    return {n: (x[n] - coefficient[n] * scaled).clamp(0, 1) for n in fitted}
