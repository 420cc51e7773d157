"""Motion-based hierarchical merging (seed 001 sec. 3.2) and the frame motion score (seed 000 sec. 3.3).

- masklet motion score = mean optical-flow magnitude over the masklet's pixels and frames
  (px/frame; frame t's pixels use the flow from t to t+1, so the last frame has none);
- masklets, and the background complement (label 0) when it is not empty, are clustered by
  score with scipy's Ward linkage and merged bottom-up, in the linkage's order, until at most
  ``capacity`` layers remain and the next merge distance exceeds ``eta_s``; as in the released
  loader merging also stops at ``min_layers`` (2) once the capacity is met;
- a merged layer's score is the mean of its members' scores; layer 0 is the one holding the
  background complement (or, with no complement, the largest), the others follow by area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import linkage

from layerkit.errors import LayerkitError


def masklet_scores(labels: np.ndarray, magnitude: np.ndarray) -> dict[int, float]:
    """Motion score of every label present in ``labels`` [F, H, W] (0 included when present),
    from ``magnitude`` [F-1, H, W] (|flow| t -> t+1). A label seen only on the last frame scores 0."""
    f = magnitude.shape[0]
    ids = np.unique(labels)
    n = int(ids.max()) + 1 if len(ids) else 1
    lab = labels[:f].ravel()
    sums = np.bincount(lab, weights=magnitude.ravel().astype(np.float64), minlength=n)
    counts = np.bincount(lab, minlength=n)
    return {int(i): float(sums[i] / counts[i]) if counts[i] else 0.0 for i in ids}


def ward_groups(scores: np.ndarray, capacity: int = 4, eta_s: float = 1.0, min_layers: int = 2) -> list[list[int]]:
    """Indices of ``scores`` [K] grouped by the merging rule above (groups in no particular order)."""
    if capacity < 1:
        raise LayerkitError(f"merge.capacity must be at least 1, got {capacity}.")
    k = len(scores)
    members: dict[int, list[int]] = {i: [i] for i in range(k)}
    if k < 2:
        return list(members.values())
    tree = linkage(np.asarray(scores, np.float64).reshape(-1, 1), method="ward")
    groups = k
    for row, (a, b, dist, _) in enumerate(tree):
        if groups <= capacity and (dist > eta_s or groups <= min_layers):
            break
        members[k + row] = members.pop(int(a)) + members.pop(int(b))
        groups -= 1
    return list(members.values())


@dataclass
class Layers:
    """Merged layers: ``masks`` bool [N, F, H, W] (a partition of every frame), ``scores`` [N]
    (px/frame), ``elements`` (element ids per layer; 0 = background complement) and the element scores."""

    masks: np.ndarray
    scores: np.ndarray
    elements: list[list[int]]
    element_scores: dict[int, float]


def merge_layers(labels: np.ndarray, magnitude: np.ndarray, capacity: int = 4, eta_s: float = 1.0,
                 min_layers: int = 2) -> Layers:
    """Element labels [F, H, W] + flow magnitude [F-1, H, W] -> :class:`Layers`."""
    element_scores = masklet_scores(labels, magnitude)
    ids = sorted(element_scores)
    groups = ward_groups(np.array([element_scores[i] for i in ids]), capacity, eta_s, min_layers)
    groups = [[ids[j] for j in g] for g in groups]
    lut = np.zeros(max(ids) + 1, np.int64)
    for g, members in enumerate(groups):
        lut[members] = g
    group_map = lut[labels]
    area = np.bincount(group_map.ravel(), minlength=len(groups))
    background = next((g for g, m in enumerate(groups) if 0 in m), int(area.argmax()))
    order = [background] + sorted((g for g in range(len(groups)) if g != background), key=lambda g: -area[g])
    masks = np.stack([group_map == g for g in order])
    scores = np.array([np.mean([element_scores[i] for i in groups[g]]) for g in order], np.float32)
    return Layers(masks, scores, [sorted(groups[g]) for g in order], element_scores)


def frame_motion_scores(magnitude: np.ndarray, percentile: float = 75.0) -> np.ndarray:
    """Frame motion score (seed 000 sec. 3.3): the ``percentile`` of |flow| in each frame, [F-1]."""
    return np.percentile(magnitude.reshape(magnitude.shape[0], -1), percentile, axis=1).astype(np.float32)
