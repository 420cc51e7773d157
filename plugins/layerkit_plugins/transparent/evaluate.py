"""Shapes-world scores of a transparent video (Layer-Animate RGBA) against a sprite clip's truth,
built from the core evaluator's metrics (:mod:`layerkit.data.evaluate`)."""

from __future__ import annotations

from typing import Any

import torch

from layerkit.data.evaluate import (
    _chosen_frames,
    _frame_colours,
    _nearest_colour,
    _shape_ious,
    alpha_iou,
    alpha_temporal_error,
    classify_colour,
    classify_shape,
    estimate_direction,
    summarise,
)
from layerkit.errors import LayerkitError, ShapeError

__all__ = ["evaluate_rgba_video", "summarise"]


def _rgba_truth(meta_or_sample: dict[str, Any] | None) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """(true alpha [F, 1, H, W] or None, the sprite's meta or None) from a clip, sample or meta dict."""
    if meta_or_sample is None:
        return None, None
    if "rgba" in meta_or_sample:  # make_rgba_sprite_clip output
        return meta_or_sample["rgba"][:, 3:], meta_or_sample.get("meta")
    if "foreground_alpha" in meta_or_sample:  # make_sample output
        sprites = meta_or_sample["meta"]["sprites"]
        return meta_or_sample["foreground_alpha"], sprites[0] if len(sprites) == 1 else None
    if "sprites" in meta_or_sample:  # a sample's meta
        sprites = meta_or_sample["sprites"]
        return None, sprites[0] if len(sprites) == 1 else None
    if "shape" in meta_or_sample or "colour" in meta_or_sample:  # one sprite's meta
        return None, meta_or_sample
    raise LayerkitError("evaluate_rgba_video needs a clip, a sample, a sample's meta or a sprite's meta.")


def evaluate_rgba_video(rgba_pred: torch.Tensor, meta_or_sample: dict[str, Any] | None = None) -> dict[str, float]:
    """Score a transparent video rgba_pred [F, 4, H, W] (straight alpha in channel 3).

    Always: alpha_temporal_error (see :func:`alpha_temporal_error`), colour_stability and
    shape_stability (fraction of classifiable frames whose per-frame colour / shape class equals the
    first such frame's; shape uses frames clear of the border when there are any) and identity_drift
    = 1 - their mean.  With a ground-truth clip or sample: alpha_iou.  With a known sprite (clip,
    one-sprite sample or meta): colour_correct, shape_correct, direction_correct.
    """
    if rgba_pred.dim() != 4 or rgba_pred.shape[1] != 4:
        raise ShapeError(f"rgba_pred has shape {tuple(rgba_pred.shape)}, expected [F, 4, H, W].")
    rgb, alpha = rgba_pred[:, :3].float(), rgba_pred[:, 3:].float()
    true_alpha, sprite = _rgba_truth(meta_or_sample)
    out: dict[str, float] = {}
    if true_alpha is not None:
        out["alpha_iou"] = alpha_iou(alpha, true_alpha)
    out["alpha_temporal_error"] = alpha_temporal_error(alpha)

    means, mass = _frame_colours(rgb, alpha)
    colour_frames = torch.nonzero(mass > 1e-3).flatten()
    if colour_frames.numel():
        names = _nearest_colour(means[colour_frames])
        out["colour_stability"] = sum(n == names[0] for n in names) / len(names)
    else:
        out["colour_stability"] = 0.0
    ious, valid, interior = _shape_ious(alpha)
    shape_frames = torch.nonzero(_chosen_frames(valid, interior)).flatten()
    if shape_frames.numel():
        labels = ious[:, shape_frames].argmax(0)
        out["shape_stability"] = (labels == labels[0]).float().mean().item()
    else:
        out["shape_stability"] = 0.0
    out["identity_drift"] = 1.0 - 0.5 * (out["colour_stability"] + out["shape_stability"])

    if sprite is not None:
        if "colour" in sprite:
            out["colour_correct"] = float(classify_colour(rgb, alpha) == sprite["colour"])
        if "shape" in sprite:
            out["shape_correct"] = float(classify_shape(alpha) == sprite["shape"])
        if "direction" in sprite:
            out["direction_correct"] = float(estimate_direction(alpha) == sprite["direction"])
    return out
