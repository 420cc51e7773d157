"""One LayerAnimate sample (before batching), as the data loader, the demo reader and the shapes
world give it, and as the LayerAnimate task and controls read it.

Letters: F frames, K keyframes (1 for ``"i2v"``, 2 for ``"interpolate"``), N the layer capacity
(4), P tracks, H x W pixels. All tensors are on the CPU, float32 unless said otherwise.

========================  ===========================  ==============================================
key                       shape / type                 meaning
========================  ===========================  ==============================================
``video``                 [F, 3, H, W] in [0, 1]       the clip (at sampling only the keyframes matter;
                                                       demo folders have no clip: a placeholder built
                                                       like a static layer, see ``demo.py``)
``prompt``                str
``fps``                   int                          the fps condition
``mode``                  ``"i2v"`` | ``"interpolate"``
``keyframe_indices``      [K] int64                    frame of each keyframe: [0] or [0, F-1]
``keyframes``             [K, 3, H, W] in [0, 1]       first (and last) frame
``layer_masks``           [N, K, 1, H, W] {0, 1}       each layer's mask on each keyframe
``layer_validity``        [N] bool                     given layers (False: padded or dropped)
``layer_static``          [N] bool                     static layers (motion-based assignment)
``motion_scores``         [N]                          normalised score in [0, 1]; -1 = no score control
``trajectory``            [N, F, 3, H, W]              heatmap in [-1, 1] (-1 = no point) + offsets
                                                       (length <= 1); "none": heatmap -1, offsets 0
``sketch``                [N, F, 3, H, W] in [0, 1]    dark lines on white; all white (1) = no sketch
``tracks``                [F, P, 2]                    the (x, y) points drawn in ``trajectory``
``track_layer``           [P] int64                    the layer of each track
========================  ===========================  ==============================================

Added to the brief's schema, because the authors' data need them: ``keyframe_indices`` (the
loader's name), ``tracks``/``track_layer`` (so that the trajectory map can be rendered again when
the training-time control choice keeps trajectories on fewer layers: its offsets are normalised by
the largest offset over all layers). The demo reader adds ``negative_prompt`` (str) and
``sampling`` (dict: ``num_inference_steps, guidance_scale, guidance_rescale, eta, seed,
num_videos_per_prompt``); the shapes world adds ``ground_truth`` (see ``shapes.py``).

Batches mixing i2v and interpolation samples need one K: :func:`two_keyframes` gives an i2v
sample the released loader's layout (K = 2, keyframe_indices [0, 0], keyframe 0 twice), which
``layers.motion_based_assignment`` reads like K = 1.

The regions the VAE encodes are not stored: ``layers.layer_regions(keyframes, layer_masks)``
gives them (in [-1, 1], 0 outside the masks), and the sketch goes to the VAE as ``sketch * 2 - 1``.
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError, ShapeError
from layerkit_plugins.layeranimate.layers import (
    DEFAULT_CAPACITY,
    MAX_MOTION_SCORE,
    STATIC_THRESHOLD,
    check_mode,
    check_motion_scores,
    keyframe_indices,
    normalise_motion_scores,
    pad_layers,
    pad_per_layer,
)
from layerkit_plugins.layeranimate.trajectory import no_trajectory, trajectory_maps

__all__ = ["SAMPLE_KEYS", "build_sample", "no_sketch", "two_keyframes", "validate_sample"]

SAMPLE_KEYS: tuple[str, ...] = (
    "video", "prompt", "fps", "mode", "keyframe_indices", "keyframes", "layer_masks", "layer_validity",
    "layer_static", "motion_scores", "trajectory", "sketch", "tracks", "track_layer",
)


def no_sketch(capacity: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The "no sketch" video ``[N, F, 3, H, W]``: all white (1)."""
    return torch.ones(capacity, num_frames, 3, height, width)


def build_sample(video: torch.Tensor, layer_masks: torch.Tensor, raw_motion_scores: torch.Tensor, *,
                 mode: str, prompt: str, fps: int, capacity: int = DEFAULT_CAPACITY,
                 tracks: torch.Tensor | None = None, track_layer: torch.Tensor | None = None,
                 sketches: torch.Tensor | None = None, static_threshold: float = STATIC_THRESHOLD,
                 max_score: float = MAX_MOTION_SCORE) -> dict[str, Any]:
    """A sample with every control present, from a clip and its n layers.

    video ``[F, 3, H, W]`` in [0, 1]; layer_masks ``[n, F, 1, H, W]`` per-frame masks (only the
    keyframes' are kept; a layer empty on every frame is never static); raw_motion_scores ``[n]``
    px/frame (-1 = unknown); tracks ``[F, P, 2]`` pixels of this frame with track_layer ``[P]``
    (0..n-1); sketches ``[n, F, 3, H, W]`` in [0, 1] (already cut to each layer; missing: white).
    """
    check_mode(mode)
    if video.ndim != 4 or video.shape[1] != 3:
        raise ShapeError(f"video has shape {tuple(video.shape)}, expected [F, 3, H, W].")
    num_frames, _, height, width = video.shape
    masks = torch.as_tensor(layer_masks).float()
    if masks.ndim != 5 or masks.shape[1] != num_frames:
        raise ShapeError(f"layer masks have shape {tuple(masks.shape)}, expected [n, {num_frames}, 1, H, W].")
    masks, validity = pad_layers((masks > 0.5).float(), capacity, (height, width))
    n = int(validity.sum())
    raw = torch.as_tensor(raw_motion_scores, dtype=torch.float32).reshape(-1)
    if raw.shape[0] != n:
        raise ShapeError(f"got {raw.shape[0]} motion scores for {n} layers.")
    scores, static = normalise_motion_scores(raw, masks[:n].flatten(1).any(1), static_threshold, max_score)
    frames = keyframe_indices(mode, num_frames)
    if tracks is None:
        tracks = torch.zeros(num_frames, 0, 2)
        track_layer = torch.zeros(0, dtype=torch.long)
    tracks = torch.as_tensor(tracks, dtype=torch.float32)
    track_layer = torch.as_tensor(track_layer, dtype=torch.long).reshape(-1)
    if tracks.ndim != 3 or tracks.shape[0] != num_frames or tracks.shape[2] != 2:
        raise ShapeError(f"tracks have shape {tuple(tracks.shape)}, expected [{num_frames}, P, 2].")
    if track_layer.numel() and (track_layer.min() < 0 or track_layer.max() >= n):
        raise LayerkitError(f"track_layer holds layer {int(track_layer.max())}; expected 0..{n - 1}.")
    sketch = no_sketch(capacity, num_frames, height, width)
    if sketches is not None:
        if tuple(sketches.shape) != (n, num_frames, 3, height, width):
            raise ShapeError(f"sketches have shape {tuple(sketches.shape)}, expected "
                             f"[{n}, {num_frames}, 3, {height}, {width}].")
        sketch[:n] = sketches.float()
    sample = {
        "video": video.float(),
        "prompt": str(prompt),
        "fps": int(fps),
        "mode": mode,
        "keyframe_indices": torch.tensor(frames, dtype=torch.long),
        "keyframes": video[frames].float().clone(),
        "layer_masks": masks[:, frames].clone(),
        "layer_validity": validity,
        "layer_static": pad_per_layer(static, capacity, False),
        "motion_scores": pad_per_layer(scores, capacity, -1.0),
        "trajectory": trajectory_maps(tracks, track_layer, height, width, capacity) if track_layer.numel()
        else no_trajectory(capacity, num_frames, height, width),
        "sketch": sketch,
        "tracks": tracks,
        "track_layer": track_layer,
    }
    return sample


def two_keyframes(sample: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy with K = 2 (an i2v sample gets keyframe 0 twice, the loader's layout);
    an interpolation sample is returned as is."""
    if sample["keyframes"].shape[0] == 2:
        return sample
    out = dict(sample)
    out["keyframe_indices"] = sample["keyframe_indices"].repeat(2)
    out["keyframes"] = sample["keyframes"].repeat(2, 1, 1, 1)
    out["layer_masks"] = sample["layer_masks"].repeat(1, 2, 1, 1, 1)
    return out


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ShapeError(message)


def validate_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Check a sample against the schema (keys, shapes, dtypes, value ranges); return it unchanged."""
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise LayerkitError(f"LayerAnimate sample lacks {', '.join(missing)}.")
    mode = check_mode(sample["mode"])
    video = sample["video"]
    _expect(video.ndim == 4 and video.shape[1] == 3, f"video has shape {tuple(video.shape)}, expected [F, 3, H, W].")
    num_frames, _, height, width = video.shape
    indices = sample["keyframe_indices"].tolist()
    allowed = [keyframe_indices(mode, num_frames)] + ([[0, 0]] if mode == "i2v" else [])
    _expect(indices in allowed, f"keyframe_indices are {indices}, expected {' or '.join(map(str, allowed))} "
                                f"for {mode}.")
    k = len(indices)
    n = sample["layer_validity"].shape[0]
    shapes = {
        "keyframe_indices": (k,), "keyframes": (k, 3, height, width), "layer_masks": (n, k, 1, height, width),
        "layer_validity": (n,), "layer_static": (n,), "motion_scores": (n,),
        "trajectory": (n, num_frames, 3, height, width), "sketch": (n, num_frames, 3, height, width),
    }
    for key, shape in shapes.items():
        _expect(tuple(sample[key].shape) == shape, f"{key} has shape {tuple(sample[key].shape)}, expected {shape}.")
    for key in ("layer_validity", "layer_static"):
        _expect(sample[key].dtype == torch.bool, f"{key} has dtype {sample[key].dtype}, expected torch.bool.")
    check_motion_scores(sample["motion_scores"])
    tracks, track_layer = sample["tracks"], sample["track_layer"]
    _expect(tracks.ndim == 3 and tracks.shape[0] == num_frames and tracks.shape[2] == 2
            and track_layer.shape == (tracks.shape[1],),
            f"tracks {tuple(tracks.shape)} and track_layer {tuple(track_layer.shape)} should be "
            f"[{num_frames}, P, 2] and [P].")
    for key in ("video", "keyframes", "sketch"):
        value = sample[key]
        if value.numel() and not (value.min() >= 0 and value.max() <= 1):
            raise LayerkitError(f"{key} has values outside [0, 1].")
    if not isinstance(sample["prompt"], str) or not isinstance(sample["fps"], int):
        raise LayerkitError("prompt must be a str and fps an int.")
    return sample
