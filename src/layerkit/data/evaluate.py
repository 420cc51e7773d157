"""Analytic evaluation against the shapes world's known ground truth.

All inputs are float tensors in [0, 1].  Letters: F frames, C channels, H height, W width;
alphas are [F, 1, H, W] (``[F, H, W]`` is accepted too), videos [F, C, H, W].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from layerkit.data.shapes import COLOURS, SHAPES, render_shape, shape_area
from layerkit.errors import ShapeError

__all__ = [
    "alpha_iou", "alpha_temporal_error", "classify_colour", "classify_shape", "compositing_error",
    "estimate_direction", "foreground_leak", "static_drift", "summarise",
]

_COLOUR_NAMES = list(COLOURS)
_COLOUR_TABLE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES], dtype=torch.float32)
_MIN_AREA = 4  # px: smaller masks are too small to classify


def _frames(alpha: torch.Tensor, name: str = "alpha") -> torch.Tensor:
    """[F, 1, H, W] or [F, H, W] -> float [F, H, W]."""
    if alpha.dim() == 4 and alpha.shape[1] == 1:
        return alpha[:, 0].float()
    if alpha.dim() == 3:
        return alpha.float()
    raise ShapeError(f"{name} has shape {tuple(alpha.shape)}, expected [F, 1, H, W] or [F, H, W].")


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ShapeError(f"expected matching shapes, got {shapes}.")


def _video(video: torch.Tensor, name: str) -> torch.Tensor:
    if video.dim() != 4:
        raise ShapeError(f"{name} has shape {tuple(video.shape)}, expected [F, C, H, W].")
    return video.float()


def alpha_iou(pred_alpha: torch.Tensor, true_alpha: torch.Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of the ``>= threshold`` masks over all frames (1.0 when both are empty)."""
    pred, true = _frames(pred_alpha, "pred_alpha") >= threshold, _frames(true_alpha, "true_alpha") >= threshold
    _same_shape(pred_alpha=pred, true_alpha=true)
    union = (pred | true).sum().item()
    return 1.0 if union == 0 else (pred & true).sum().item() / union


def compositing_error(fg_rgb: torch.Tensor, fg_alpha: torch.Tensor, background: torch.Tensor,
                      blended: torch.Tensor) -> float:
    """Mean |blended - (fg_rgb * fg_alpha + background * (1 - fg_alpha))|; fg_rgb/background/blended [F, 3, H, W]."""
    fg_rgb, background, blended = _video(fg_rgb, "fg_rgb"), _video(background, "background"), _video(blended, "blended")
    _same_shape(fg_rgb=fg_rgb, background=background, blended=blended)
    a = _frames(fg_alpha, "fg_alpha").unsqueeze(1)
    if a.shape[0] != fg_rgb.shape[0] or a.shape[2:] != fg_rgb.shape[2:]:
        raise ShapeError(f"fg_alpha has shape {tuple(fg_alpha.shape)}, expected [F, 1, H, W] matching {tuple(fg_rgb.shape)}.")
    return (blended - (fg_rgb * a + background * (1 - a))).abs().mean().item()


def _nearest_colour(rgb: torch.Tensor) -> list[str]:
    """Vocabulary colour names nearest to each row of rgb [..., 3] (flattened)."""
    dist = torch.cdist(rgb.reshape(-1, 3).float(), _COLOUR_TABLE)
    return [_COLOUR_NAMES[i] for i in dist.argmin(1).tolist()]


def _frame_colours(rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha-weighted mean colour per frame [F, 3] and alpha mass per frame [F]."""
    rgb = _video(rgb, "rgb")
    a = _frames(alpha).unsqueeze(1)
    mass = a.sum((1, 2, 3))
    mean = (rgb * a).sum((2, 3)) / mass.clamp(min=1e-8).unsqueeze(1)
    return mean, mass


def classify_colour(rgb: torch.Tensor, alpha: torch.Tensor) -> str:
    """Nearest vocabulary colour to the alpha-weighted mean of rgb [F, 3, H, W] under alpha [F, 1, H, W]
    (the plain mean when alpha is empty)."""
    means, mass = _frame_colours(rgb, alpha)
    total = mass.sum()
    mean = (means * mass.unsqueeze(1)).sum(0) / total if total > 1e-8 else _video(rgb, "rgb").mean((0, 2, 3))
    return _nearest_colour(mean)[0]


def _mask_stats(alpha: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Binary masks [F, H, W], their area [F], centroid x, y [F] and border-touching flags [F]."""
    mask = _frames(alpha) >= 0.5
    F, H, W = mask.shape
    m = mask.float()
    area = m.sum((1, 2))
    cx = (m * torch.arange(W, dtype=torch.float32)).sum((1, 2)) / area.clamp(min=1)
    cy = (m * torch.arange(H, dtype=torch.float32).view(H, 1)).sum((1, 2)) / area.clamp(min=1)
    border = mask[:, 0].any(1) | mask[:, -1].any(1) | mask[:, :, 0].any(1) | mask[:, :, -1].any(1)
    return mask, area, cx, cy, border


def _shape_ious(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU [S, F] of each frame's mask with each vocabulary shape at the mask's centroid and area,
    plus per-frame flags: classifiable [F] and classifiable-and-clear-of-the-border [F]."""
    mask, area, cx, cy, border = _mask_stats(alpha)
    F, H, W = mask.shape
    ious = []
    for shape in SHAPES:
        size = torch.sqrt(area.clamp(min=1) / shape_area(shape, 1.0))
        cand = render_shape(shape, cx, cy, size, H, W, softness=1.0) >= 0.5
        inter = (cand & mask).sum((1, 2)).float()
        union = (cand | mask).sum((1, 2)).float().clamp(min=1)
        ious.append(inter / union)
    valid = area >= _MIN_AREA
    return torch.stack(ious), valid, valid & ~border


def _chosen_frames(valid: torch.Tensor, interior: torch.Tensor) -> torch.Tensor:
    return interior if interior.any() else valid


def classify_shape(alpha: torch.Tensor) -> str:
    """Vocabulary shape whose rendering at each frame's mask centroid and area has the best mean IoU.

    alpha [F, 1, H, W]; frames whose mask touches the frame border are ignored when any other frame
    is classifiable.  Returns ``"unknown"`` when no frame has a mask of at least 4 px.
    """
    ious, valid, interior = _shape_ious(alpha)
    frames = _chosen_frames(valid, interior)
    if not frames.any():
        return "unknown"
    return SHAPES[int(ious[:, frames].mean(1).argmax())]


def _centroids(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha-weighted centroid (x, y) [F, 2] and mass [F] of a [F, H, W]."""
    F, H, W = a.shape
    mass = a.sum((1, 2))
    cx = (a * torch.arange(W, dtype=torch.float32)).sum((1, 2))
    cy = (a * torch.arange(H, dtype=torch.float32).view(H, 1)).sum((1, 2))
    return torch.stack([cx, cy], 1) / mass.clamp(min=1e-8).unsqueeze(1), mass


def estimate_direction(alpha: torch.Tensor, min_speed: float = 0.2) -> str:
    """Direction word from the centroid displacement between the first and last non-empty frames of
    alpha [F, 1, H, W]; below ``min_speed`` px/frame (or fewer than two non-empty frames) it is "still"."""
    centre, mass = _centroids(_frames(alpha))
    idx = torch.nonzero(mass > 1e-3).flatten()
    if idx.numel() < 2:
        return "still"
    first, last = int(idx[0]), int(idx[-1])
    dx, dy = (centre[last] - centre[first]).tolist()
    if math.hypot(dx, dy) / (last - first) < min_speed:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def static_drift(video: torch.Tensor) -> float:
    """Mean |video[t] - video[0]| over all frames of video [F, C, H, W] (0 for a perfectly static layer)."""
    video = _video(video, "video")
    return (video - video[:1]).abs().mean().item()


def foreground_leak(background_pred: torch.Tensor, true_fg_alpha: torch.Tensor, true_background: torch.Tensor) -> float:
    """Alpha-weighted mean |background_pred - true_background| inside the true foreground region.

    background_pred, true_background [F, 3, H, W]; true_fg_alpha [F, 1, H, W].  High values mean the
    predicted background still shows (or hallucinates wrongly behind) the foreground; 0 when there is no foreground.
    """
    pred, true = _video(background_pred, "background_pred"), _video(true_background, "true_background")
    _same_shape(background_pred=pred, true_background=true)
    w = _frames(true_fg_alpha, "true_fg_alpha").unsqueeze(1)
    total = w.sum().item() * pred.shape[1]
    return 0.0 if total <= 0 else ((pred - true).abs() * w).sum().item() / total


def alpha_temporal_error(alpha: torch.Tensor) -> float:
    """Mean |alpha[t] - alpha[t+1] shifted so its centroid meets alpha[t]'s| over consecutive frames.

    alpha [F, 1, H, W]; the shift is sub-pixel (bilinear), so a rigidly moving sprite scores near 0
    and flicker or deformation scores higher.  0 for fewer than two frames.
    """
    a = _frames(alpha)
    F, H, W = a.shape
    if F < 2:
        return 0.0
    centre, mass = _centroids(a)
    d = centre[1:] - centre[:-1]
    d[(mass[1:] <= 1e-3) | (mass[:-1] <= 1e-3)] = 0.0
    gx = torch.arange(W, dtype=torch.float32).view(1, 1, W) + d[:, 0].view(-1, 1, 1)
    gy = torch.arange(H, dtype=torch.float32).view(1, H, 1) + d[:, 1].view(-1, 1, 1)
    grid = torch.stack([(2 * gx / (W - 1) - 1).expand(F - 1, H, W), (2 * gy / (H - 1) - 1).expand(F - 1, H, W)], -1)
    shifted = nnf.grid_sample(a[1:].unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (a[:-1] - shifted[:, 0]).abs().mean().item()


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the rows that have it (NaNs skipped)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None and not math.isnan(float(value)):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}
