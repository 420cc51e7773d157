"""Shapes-world scores of layered outputs (LayerFlow's four layers against ``make_sample`` truth),
built from the core evaluator's metrics (:mod:`layerkit.data.evaluate`)."""

from __future__ import annotations

from typing import Any

import torch

from layerkit.data.evaluate import (
    alpha_iou,
    classify_colour,
    classify_shape,
    compositing_error,
    estimate_direction,
    foreground_leak,
    static_drift,
    summarise,
)
from layerkit.errors import ShapeError
from layerkit_plugins.layered.task import GIVEN

__all__ = ["PLACED", "composite_alpha", "evaluate_layered", "summarise"]


#: modes whose given input fixes where the sprite is and whose matte is generated: there the matte is
#: scored against the true one (fg2bg is given the matte itself)
PLACED = ("decompose",)


def composite_alpha(fg_rgb: torch.Tensor, fg_alpha: torch.Tensor, background: torch.Tensor,
                    blended: torch.Tensor) -> torch.Tensor:
    """The matte a composite implies [F, 1, H, W]: per pixel, how far the blended video has moved
    from the background towards the foreground's colour, ``(blended - bg) . (c - bg) / |c - bg|^2``
    clamped to [0, 1], with ``c`` the foreground's mean colour under its own matte (one sprite; the
    mid-grey of an empty matte). Equal to the matte wherever blended = fg x alpha + bg x (1 - alpha)."""
    a = fg_alpha.float()
    mass = a.sum()
    c = (fg_rgb.float() * a).sum((0, 2, 3)) / mass if mass > 1e-6 else torch.full((3,), 0.5)
    towards = c.view(1, 3, 1, 1) - background.float()
    moved = blended.float() - background.float()
    return ((moved * towards).sum(1, keepdim=True) / towards.pow(2).sum(1, keepdim=True).clamp_min(0.05)).clamp(0, 1)


def evaluate_layered(pred: dict[str, torch.Tensor], sample: dict[str, Any], mode: str = "decompose") -> dict[str, float]:
    """Score predicted layers against a ``make_sample`` ground truth.

    ``pred`` may hold "foreground_rgb" [F, 3, H, W], "foreground_alpha" [F, 1, H, W], "background"
    [F, 3, H, W] and "blended" [F, 3, H, W]; metrics whose inputs are missing are skipped.  Returns:

    - ``alpha_iou_heldout``: the matte against the held-out clip's own alpha;
    - ``alpha_iou_composite``: the matte against the one the output composite implies
      (:func:`composite_alpha`: does the matte cover exactly the sprite the output blended video
      shows over the output background); 0 when neither shows a sprite (every shapes prompt asks for one);
    - ``alpha_iou``: the one of the two that measures quality in ``mode``: the held-out alpha when
      the given input fixes where the sprite is (decompose: the blended clip), the composite's when
      nothing does (generate, bg2fg: the prompt names colour, shape and motion, not the place, so
      the held-out alpha would measure luck of placement) or when the matte is itself given
      (fg2bg: does the generated blended clip show the given sprite where its matte is);
    - compositing_error (pred layers against pred "blended", or the true blended clip when pred has
      none); colour_correct (per sprite, inside its true visible mask, averaged); shape_correct
      and direction_correct (single-sprite samples only); background_leak; background_error
      (decompose only: mean |background - true background| where the true matte is 0, the
      background the given clip shows); background_static_drift (only when the true background is static).

    The figures of a layer the mode was given are left out (they would score the input, not the
    model): fg2bg's ``alpha_iou_heldout``, colour, shape and direction; bg2fg's background_leak and
    background_static_drift.
    """
    out: dict[str, float] = {}
    sprites = sample["meta"]["sprites"]
    fg_rgb, fg_alpha, bg = pred.get("foreground_rgb"), pred.get("foreground_alpha"), pred.get("background")
    for key, value in pred.items():
        if key in sample and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(sample[key].shape):
            raise ShapeError(f"pred['{key}'] has shape {tuple(value.shape)}, expected {tuple(sample[key].shape)}.")
    foreground_given, background_given = "foreground" in GIVEN.get(mode, ()), "background" in GIVEN.get(mode, ())
    if fg_alpha is not None and not foreground_given:
        out["alpha_iou_heldout"] = alpha_iou(fg_alpha, sample["foreground_alpha"])
        out["alpha_iou"] = out["alpha_iou_heldout"]
    if fg_rgb is not None and fg_alpha is not None and bg is not None and "blended" in pred:
        implied = composite_alpha(fg_rgb, fg_alpha, bg, pred["blended"])
        shown = (implied >= 0.5).any() or (fg_alpha >= 0.5).any()
        out["alpha_iou_composite"] = alpha_iou(fg_alpha, implied) if shown else 0.0
        if mode not in PLACED:
            out["alpha_iou"] = out["alpha_iou_composite"]
    if fg_rgb is not None and fg_alpha is not None and bg is not None:
        out["compositing_error"] = compositing_error(fg_rgb, fg_alpha, bg, pred.get("blended", sample["blended"]))
    if fg_rgb is not None and fg_alpha is not None and not foreground_given:
        if len(sprites) == 1:
            out["colour_correct"] = float(classify_colour(fg_rgb, fg_alpha) == sprites[0]["colour"])
        else:
            hits = []
            for i, sp in enumerate(sprites, start=1):
                weight = fg_alpha * sample["layer_masks"][i]
                if weight.sum() > 0:
                    hits.append(float(classify_colour(fg_rgb, weight) == sp["colour"]))
            if hits:
                out["colour_correct"] = sum(hits) / len(hits)
    if fg_alpha is not None and len(sprites) == 1 and not foreground_given:
        out["shape_correct"] = float(classify_shape(fg_alpha) == sprites[0]["shape"])
        out["direction_correct"] = float(estimate_direction(fg_alpha) == sprites[0]["direction"])
    if bg is not None and not background_given:
        out["background_leak"] = foreground_leak(bg, sample["foreground_alpha"], sample["background"])
        shown = (sample["foreground_alpha"] <= 0).expand_as(bg)
        if mode == "decompose" and shown.any():  # the given clip shows the background where the true matte is 0
            out["background_error"] = (bg.float() - sample["background"].float()).abs()[shown].mean().item()
        if bool(sample["static"][0]):
            out["background_static_drift"] = static_drift(bg)
    return out
