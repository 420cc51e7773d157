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

__all__ = ["evaluate_layered", "summarise"]


def evaluate_layered(pred: dict[str, torch.Tensor], sample: dict[str, Any]) -> dict[str, float]:
    """Score predicted layers against a ``make_sample`` ground truth.

    ``pred`` may hold "foreground_rgb" [F, 3, H, W], "foreground_alpha" [F, 1, H, W], "background"
    [F, 3, H, W] and "blended" [F, 3, H, W]; metrics whose inputs are missing are skipped.  Returns:
    alpha_iou; compositing_error (pred layers against pred "blended", or the true blended clip when
    pred has none); colour_correct (per sprite, inside its true visible mask, averaged); shape_correct
    and direction_correct (single-sprite samples only); background_leak; background_static_drift
    (only when the true background is static).
    """
    out: dict[str, float] = {}
    sprites = sample["meta"]["sprites"]
    fg_rgb, fg_alpha, bg = pred.get("foreground_rgb"), pred.get("foreground_alpha"), pred.get("background")
    for key, value in pred.items():
        if key in sample and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(sample[key].shape):
            raise ShapeError(f"pred['{key}'] has shape {tuple(value.shape)}, expected {tuple(sample[key].shape)}.")
    if fg_alpha is not None:
        out["alpha_iou"] = alpha_iou(fg_alpha, sample["foreground_alpha"])
    if fg_rgb is not None and fg_alpha is not None and bg is not None:
        out["compositing_error"] = compositing_error(fg_rgb, fg_alpha, bg, pred.get("blended", sample["blended"]))
    if fg_rgb is not None and fg_alpha is not None:
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
    if fg_alpha is not None and len(sprites) == 1:
        out["shape_correct"] = float(classify_shape(fg_alpha) == sprites[0]["shape"])
        out["direction_correct"] = float(estimate_direction(fg_alpha) == sprites[0]["direction"])
    if bg is not None:
        out["background_leak"] = foreground_leak(bg, sample["foreground_alpha"], sample["background"])
        if bool(sample["static"][0]):
            out["background_static_drift"] = static_drift(bg)
    return out
