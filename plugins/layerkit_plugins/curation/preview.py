"""The preview PNG of a curated clip: the frames, then one row per layer with its mask over the
frames (other layers dimmed), its motion score and its sampled tracks drawn up to each frame."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from layerkit.io.preview import write_preview_sheet

COLOURS = [(255, 64, 64), (64, 200, 255), (255, 220, 0), (160, 255, 96), (255, 96, 255), (255, 160, 64)]


def write_clip_preview(path: Path, frames: np.ndarray, masks: np.ndarray, scores: np.ndarray, tracks: np.ndarray,
                       track_layer: np.ndarray, *, max_frames: int = 8, min_size: int = 96) -> Path:
    """frames uint8 [F, H, W, 3], masks bool [N, F, H, W], scores [N], tracks [F, T, 3], track_layer [T]."""
    f, h, w = frames.shape[:3]
    scale = max(1, int(np.ceil(min_size / min(h, w))))
    big = np.repeat(np.repeat(frames, scale, 1), scale, 2)
    rows = {"frames": big}
    for i, (mask, score) in enumerate(zip(masks, scores)):
        m = np.repeat(np.repeat(mask, scale, 1), scale, 2)[..., None]
        colour = np.array(COLOURS[i % len(COLOURS)], np.float32)
        tinted = np.where(m, 0.55 * big + 0.45 * colour, 0.25 * big).astype(np.uint8)
        mine = tracks[:, track_layer == i]
        for t in range(f):
            canvas = np.ascontiguousarray(tinted[t])
            for k in range(mine.shape[1]):
                pts = np.round((mine[: t + 1, k, :2] + 0.5) * scale - 0.5).astype(np.int32)
                if len(pts) > 1:
                    cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, (255, 255, 255), 1, cv2.LINE_AA)
                dot = (255, 255, 255) if mine[t, k, 2] > 0.5 else (120, 120, 120)
                cv2.circle(canvas, (int(pts[-1][0]), int(pts[-1][1])), max(2, scale), dot, -1, cv2.LINE_AA)
            tinted[t] = canvas
        label = f"layer {i}  score {score:.2f} px/frame  {mine.shape[1]} track{'s' if mine.shape[1] != 1 else ''}"
        rows[label] = tinted
    return write_preview_sheet(path, rows, max_frames=max_frames, overwrite=True)
