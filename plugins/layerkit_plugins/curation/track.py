"""Point tracking (seed 001 sec. 4.3) and the per-layer trajectories the curation keeps.

Trackers map frames ``uint8 [F, H, W, 3]``, first-frame points ``float32 [P, 2]`` (x, y) and the
:class:`~layerkit_plugins.curation.flow.Flow` to tracks ``float32 [F, P, 2]`` and visibility
``float32 [F, P]`` in [0, 1]:
- ``lucas_kanade`` (default, CPU): OpenCV pyramidal Lucas-Kanade frame to frame; a point is
  visible where the forward-backward check agrees within ``fb_threshold`` px; where it does not
  (occluded, say) it goes on at its last reliable velocity (reported with visibility 0) and
  Lucas-Kanade picks it up again from there;
- ``cotracker3``: CoTracker3 (offline) from a user's checkout of facebookresearch/co-tracker and
  its checkpoint (no PyPI package; checkpoints are CC-BY-NC).

:func:`layer_tracks` then applies the paper's rule: a track belongs to the layer under its first
point and is kept when at least ``in_layer_ratio`` of its in-frame points stay inside that layer
(and its mean visibility exceeds ``min_visibility``, as the released loader asks); 1 to 3 tracks
per layer are sampled, weighted by their motion (mean displacement per frame).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.flow import Flow
from layerkit_plugins.curation.steps import check_frames, load_state_dict, local_path, resolve_device


def grid_points(height: int, width: int, grid: int) -> np.ndarray:
    """A ``grid`` x ``grid`` lattice of cell centres (at most one point per pixel): float32 [P, 2] (x, y)."""
    gx, gy = min(grid, width), min(grid, height)
    xs = (np.arange(gx) + 0.5) * width / gx - 0.5
    ys = (np.arange(gy) + 0.5) * height / gy - 0.5
    x, y = np.meshgrid(xs, ys)
    return np.stack([x.ravel(), y.ravel()], -1).astype(np.float32)


def _sample_flow(flow: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear flow [H, W, 2] at points [P, 2] (x, y), clamped to the frame."""
    h, w = flow.shape[:2]
    x = np.clip(points[:, 0], 0, w - 1)
    y = np.clip(points[:, 1], 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = (x - x0)[:, None], (y - y0)[:, None]
    top = flow[y0, x0] * (1 - ax) + flow[y0, x1] * ax
    bottom = flow[y1, x0] * (1 - ax) + flow[y1, x1] * ax
    return top * (1 - ay) + bottom * ay


class LucasKanadeTracker:
    """OpenCV pyramidal Lucas-Kanade with a forward-backward check (see module doc)."""

    role = "tracker"

    def __init__(self, window: int = 15, levels: int = 3, fb_threshold: float = 1.0) -> None:
        self.window, self.levels, self.fb_threshold = int(window), int(levels), float(fb_threshold)

    def __call__(self, frames: np.ndarray, points: np.ndarray, flow: Flow) -> tuple[np.ndarray, np.ndarray]:
        frames = check_frames(frames)
        f, h, w = frames.shape[:3]
        grey = [cv2.cvtColor(fr, cv2.COLOR_RGB2GRAY) for fr in frames]
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        tracks = np.zeros((f, len(pts), 2), np.float32)
        vis = np.zeros((f, len(pts)), np.float32)
        tracks[0] = pts
        vis[0] = 1.0
        if not len(pts):
            return tracks, vis
        lk = {"winSize": (self.window, self.window), "maxLevel": self.levels,
              "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)}
        velocity = np.zeros_like(pts)  # last reliable displacement per frame of each point
        for t in range(f - 1):
            p0 = tracks[t].reshape(-1, 1, 2)
            p1, st1, _ = cv2.calcOpticalFlowPyrLK(grey[t], grey[t + 1], p0, None, **lk)
            back, st2, _ = cv2.calcOpticalFlowPyrLK(grey[t + 1], grey[t], p1, None, **lk)
            p1, back = p1.reshape(-1, 2), back.reshape(-1, 2)
            fb = np.linalg.norm(back - tracks[t], axis=-1)
            inside = (p1[:, 0] >= 0) & (p1[:, 0] <= w - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= h - 1)
            ok = (st1.ravel() == 1) & (st2.ravel() == 1) & (fb < self.fb_threshold) & inside
            if t == 0:  # no history yet: the dense flow is the best guess
                velocity = _sample_flow(flow.forward[0], tracks[0])
            velocity = np.where(ok[:, None], p1 - tracks[t], velocity)
            tracks[t + 1] = np.where(ok[:, None], p1, tracks[t] + velocity)
            vis[t + 1] = ok
        return tracks, vis


class CoTracker3Tracker:
    """CoTracker3 from a local checkout (``checkout``: the co-tracker repository, holding
    ``cotracker/predictor.py``) and checkpoint (``checkpoint``: e.g. ``scaled_offline.pth``)."""

    role = "tracker"

    def __init__(self, checkout: str | None = None, checkpoint: str | None = None, offline: bool = True,
                 window_len: int = 60, visibility_threshold: float = 0.5, device: str = "auto") -> None:
        repo = local_path(checkout, "CoTracker3", "tracker.checkout", kind="dir")
        if not (repo / "cotracker" / "predictor.py").is_file():
            raise LayerkitError(f"'{repo}' is not a checkout of facebookresearch/co-tracker "
                                "(it has no cotracker/predictor.py).")
        state = load_state_dict(checkpoint, "CoTracker3", "tracker.checkpoint")
        if not any(k.startswith("fnet.") for k in state) or not any("updateformer" in k for k in state):
            raise LayerkitError(f"'{checkpoint}' holds no CoTracker3 weights (no fnet/updateformer tensors); "
                                "give the scaled_offline.pth or scaled_online.pth checkpoint.")
        if str(repo) not in sys.path:
            sys.path.insert(0, str(repo))
        try:
            from cotracker.predictor import CoTrackerPredictor
        except Exception as exc:
            raise LayerkitError(f"the CoTracker checkout '{repo}' could not be imported ({type(exc).__name__}: "
                                f"{exc}); install its requirements.") from None
        self.device = resolve_device(device)
        self.model = CoTrackerPredictor(checkpoint=str(Path(str(checkpoint)).expanduser()), offline=offline,
                                        window_len=window_len).to(self.device).eval()
        self.visibility_threshold = float(visibility_threshold)

    def __call__(self, frames: np.ndarray, points: np.ndarray, flow: Flow) -> tuple[np.ndarray, np.ndarray]:
        import torch

        frames = check_frames(frames)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float().to(self.device)
        pts = torch.as_tensor(np.asarray(points, np.float32).reshape(-1, 2))
        queries = torch.cat([torch.zeros(len(pts), 1), pts], -1)[None].to(self.device)  # (t, x, y)
        with torch.inference_mode():
            tracks, vis = self.model(video, queries=queries)
        vis = vis[0].float().cpu().numpy()
        return tracks[0].float().cpu().numpy(), (vis > self.visibility_threshold).astype(np.float32)


@dataclass
class LayerTracks:
    """Tracks kept for the layers: ``tracks`` [F, T, 3] (x, y, visibility) sampled 1 to 3 per layer,
    ``layer`` [T]; ``pool`` [F, M, 3] and ``pool_layer`` [M]: all kept tracks (capped per layer),
    for a data loader that samples its own."""

    tracks: np.ndarray
    layer: np.ndarray
    pool: np.ndarray
    pool_layer: np.ndarray


def layer_tracks(tracks: np.ndarray, visibility: np.ndarray, masks: np.ndarray, *, in_layer_ratio: float = 0.8,
                 min_visibility: float = 0.1, per_layer: tuple[int, int] = (1, 3), pool_per_layer: int = 64,
                 seed: int = 0) -> LayerTracks:
    """The paper's trajectory rule over ``tracks`` [F, P, 2], ``visibility`` [F, P] and layer
    ``masks`` bool [N, F, H, W] (module doc)."""
    f, p = visibility.shape
    n, _, h, w = masks.shape
    rng = np.random.default_rng(seed)
    xi = np.clip(np.round(tracks[..., 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(tracks[..., 1]).astype(int), 0, h - 1)
    inframe = (tracks[..., 0] >= 0) & (tracks[..., 0] <= w - 1) & (tracks[..., 1] >= 0) & (tracks[..., 1] <= h - 1)
    owner = np.argmax(masks[:, 0, yi[0], xi[0]], axis=0)  # [P] the layer under the first point
    inside = masks[owner[None, :], np.arange(f)[:, None], yi, xi] & inframe  # [F, P]
    ratio = inside.sum(0) / np.maximum(inframe.sum(0), 1)
    keep = (ratio >= in_layer_ratio) & (visibility.mean(0) > min_visibility)
    motion = np.linalg.norm(np.diff(tracks, axis=0), axis=-1).mean(0) if f > 1 else np.zeros(p)
    full = np.concatenate([tracks, visibility[..., None]], -1).astype(np.float32)
    chosen, pool = [], []
    low, high = per_layer
    for layer in range(n):
        ids = np.flatnonzero(keep & (owner == layer))
        if not len(ids):
            continue
        count = min(len(ids), int(rng.integers(low, high + 1)))
        weight = motion[ids] + 1e-6
        chosen.extend((layer, i) for i in rng.choice(ids, count, replace=False, p=weight / weight.sum()))
        pool.extend((layer, i) for i in rng.permutation(ids)[:pool_per_layer])

    def pick(pairs: list[tuple[int, Any]]) -> tuple[np.ndarray, np.ndarray]:
        if not pairs:
            return np.zeros((f, 0, 3), np.float32), np.zeros(0, np.int64)
        layers, ids = zip(*pairs)
        return full[:, list(ids)], np.asarray(layers, np.int64)

    (t, tl), (pl, pll) = pick(chosen), pick(pool)
    return LayerTracks(t, tl, pl, pll)
