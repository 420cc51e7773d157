"""What LayerAnimate's controls promise, measured on shapes-world samples (their ground truth):

- ``frame_error``: mean absolute error of the video against the true clip (all frames);
- ``keyframe_error``: the same on the given keyframes (how faithfully they come back);
- ``static_drift``: for layers marked static, the mean absolute change of their true region over
  the frames (0: the layer stands still, as the static assignment asks).
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.data.evaluate import summarise


def evaluate_layers(outputs: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> dict[str, float]:
    rows = []
    for i, out in enumerate(outputs):
        video = out["video"].float()  # [F, 3, H, W]
        truth = batch["video"][i].float()
        row = {"frame_error": (video - truth).abs().mean().item()}
        frames = [0, video.shape[0] - 1] if batch["mode"][i] == "interpolate" else [0]
        row["keyframe_error"] = (video[frames] - truth[frames]).abs().mean().item()
        gt = batch["ground_truth"][i]
        drifts = []
        for n in range(gt["layer_validity"].shape[0]):
            if bool(gt["layer_validity"][n]) and bool(batch["layer_static"][i][n]):
                mask = gt["layer_masks"][n, 0].float()  # [1, H, W] on frame 0
                if mask.sum() > 0:
                    drifts.append(((video - video[:1]).abs() * mask).sum().item() / (mask.sum().item() * 3 * video.shape[0]))
        if drifts:
            row["static_drift"] = sum(drifts) / len(drifts)
        rows.append(row)
    return summarise(rows)
