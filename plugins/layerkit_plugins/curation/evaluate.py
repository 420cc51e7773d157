"""Curation measured on the shapes world, whose layers, motions and tracks are known.

- ``layer_iou``: each truth layer group is matched one-to-one to a curated layer (Hungarian on
  IoU over all frames); its IoU counts, an unmatched group counts 0; the clip's figure is the mean
  over groups. The truth's layers are first grouped by the same merging rule the pipeline uses
  (layers that move alike are one layer by design), with two choices of the scores it groups by:
  ``flow`` (each truth layer's mean flow magnitude from the same flow as the pipeline: isolates the
  segmentation) and ``truth`` (the true speeds: segmentation and flow together).
- ``motion_pairs``: (true speed, curated score of the layer that holds most of the truth layer)
  per truth layer, for a Spearman rank correlation pooled over clips.
- ``track_errors``: the tracker run from the truth's visible first-frame points; the error is the
  distance to the true point in every frame where the truth sees it (background points that wrap
  around the frame are left out).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from layerkit_plugins.curation.merge import masklet_scores, ward_groups


def frames_uint8(sample: dict[str, Any], key: str = "blended") -> np.ndarray:
    """A shapes-world clip ``[F, 3, H, W]`` in [0, 1] as RGB ``uint8 [F, H, W, 3]``."""
    return (sample[key].permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def truth_groups(sample: dict[str, Any], scores: np.ndarray, capacity: int, eta_s: float,
                 min_layers: int = 2) -> np.ndarray:
    """The truth's layer masks grouped by the merging rule on ``scores`` [N]: bool [G, F, H, W]."""
    masks = sample["layer_masks"][:, :, 0].numpy() > 0.5
    groups = ward_groups(np.asarray(scores, np.float64), capacity, eta_s, min_layers)
    return np.stack([masks[g].any(0) for g in groups])


def truth_flow_scores(sample: dict[str, Any], magnitude: np.ndarray) -> np.ndarray:
    """Each truth layer's motion score from a flow magnitude [F-1, H, W], as the pipeline scores masklets."""
    masks = sample["layer_masks"][:, :, 0].numpy() > 0.5
    labels = np.argmax(masks, axis=0).astype(np.int32) + 1  # the masks partition every frame
    scores = masklet_scores(labels, magnitude)
    return np.array([scores.get(i + 1, 0.0) for i in range(len(masks))])


def layer_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over truth layers [G, F, H, W] of the IoU with their one-to-one matched curated layer [L, F, H, W]."""
    p = pred.reshape(len(pred), -1).astype(bool)
    t = truth.reshape(len(truth), -1).astype(bool)
    inter = (t[:, None] & p[None]).sum(-1)
    union = (t[:, None] | p[None]).sum(-1)
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(-iou)
    per = np.zeros(len(t))
    per[rows] = iou[rows, cols]
    return float(per.mean())


def motion_pairs(sample: dict[str, Any], pred_masks: np.ndarray, pred_scores: np.ndarray) -> list[tuple[float, float]]:
    """(true speed, curated score of the layer holding most of it) for every truth layer."""
    masks = sample["layer_masks"][:, :, 0].numpy() > 0.5
    out = []
    for i, speed in enumerate(sample["motion_scores"].tolist()):
        overlap = (pred_masks & masks[i][None]).reshape(len(pred_masks), -1).sum(-1)
        if overlap.max() > 0:
            out.append((float(speed), float(pred_scores[int(overlap.argmax())])))
    return out


def spearman(pairs: list[tuple[float, float]]) -> float:
    if len(pairs) < 3:
        return float("nan")
    truth, est = zip(*pairs)
    return float(spearmanr(truth, est).statistic)


def track_errors(sample: dict[str, Any], tracks: np.ndarray) -> np.ndarray:
    """Per-frame errors (px) of ``tracks`` [F, P, 2] started from the truth's points in the order
    of :func:`track_queries`; only frames where the truth sees the point."""
    truth, vis = _truth_points(sample)
    keep = _query_mask(truth, vis, sample)
    truth, vis = truth[:, keep], vis[:, keep]
    err = np.linalg.norm(tracks - truth, axis=-1)
    return err[vis]


def track_queries(sample: dict[str, Any]) -> np.ndarray:
    """First-frame (x, y) [P, 2] of the truth points that are visible there and never wrap around."""
    truth, vis = _truth_points(sample)
    return truth[0, _query_mask(truth, vis, sample)]


def _truth_points(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    traj = sample["trajectories"].numpy()  # [N, F, P, 2]
    vis = sample["trajectory_visibility"].numpy() > 0.5  # [N, F, P]
    n, f, p, _ = traj.shape
    return traj.transpose(1, 0, 2, 3).reshape(f, n * p, 2), vis.transpose(1, 0, 2).reshape(f, n * p)


def _query_mask(truth: np.ndarray, vis: np.ndarray, sample: dict[str, Any]) -> np.ndarray:
    h, w = sample["blended"].shape[-2:]
    jumps = np.abs(np.diff(truth, axis=0)).max(axis=(0, 2)) if len(truth) > 1 else np.zeros(truth.shape[1])
    return vis[0] & (jumps < min(h, w) / 2)
