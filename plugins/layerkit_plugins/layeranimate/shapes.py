"""LayerAnimate samples (``schema.py``) from the shapes world (``layerkit.data.shapes.make_sample``).

The shapes world gives what the curation pipeline would: per-frame layer masks (a partition,
layer 0 the background), motion scores in px/frame, tracked points with visibility, per-layer
line sketches. From them, as the released loader and the paper do it:

- masks padded to the layer capacity; motion scores normalised (static below
  ``static_threshold`` px/frame, then ``min(s, s_max) / s_max``). ``max_score=None`` scales the
  paper's s_max = 30 px/frame (at 320 x 512) to the frame: ``30 * min(H, W) / 320``, so that the
  shapes world's 0.5-1.5 px/frame at 32 x 32 do not all map to ~0.03;
- tracks: the layer's points flattened to ``[F, P, 3]`` (x, y, visibility), tracks that jump by
  more than half the frame between two frames dropped (the background texture wraps around the
  frame; a tracker would not follow such a jump), then the loader's selection
  (``trajectory.select_tracks``, objects = layers, no merging here) and each track given the layer
  under its first point;
- sketches: each layer's lines cut to its own mask, dilated by 1 px so that a layer keeps its whole
  outline (paper: "remove the area of other layers"), drawn dark on white RGB like the authors'
  ``sketch.mp4``.

``ground_truth`` (for evaluators), padded to the capacity: ``layer_masks`` [N, F, 1, H, W] (all
frames), ``tracks`` [N, F, P0, 2] and ``track_visibility`` [N, F, P0] (every point of the world,
0 visibility on padded layers), ``motion_scores`` [N] raw px/frame (-1 padded), ``static`` [N] bool,
``layer_validity`` [N], ``prompts`` (N strings, "" padded).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from layerkit.data.shapes import ShapesConfig, make_sample
from layerkit.errors import LayerkitError
from layerkit_plugins.layeranimate.controls import apply_training_choices, draw_training_choices
from layerkit_plugins.layeranimate.layers import (
    DEFAULT_CAPACITY,
    MAX_MOTION_SCORE,
    STATIC_THRESHOLD,
    pad_per_layer,
)
from layerkit_plugins.layeranimate.schema import build_sample
from layerkit_plugins.layeranimate.trajectory import assign_track_layers, select_tracks

__all__ = ["shapes_layeranimate_sample", "shapes_max_score", "shapes_training_sample"]


def shapes_max_score(height: int, width: int) -> float:
    """s_max for a frame: the paper's 30 px/frame at 320 x 512, scaled by ``min(H, W) / 320``."""
    return MAX_MOTION_SCORE * min(height, width) / 320


def shapes_layeranimate_sample(world: int | dict[str, Any], *, mode: str, generator: torch.Generator,
                               capacity: int = DEFAULT_CAPACITY, config: ShapesConfig | None = None,
                               fps: int = 8, static_threshold: float = STATIC_THRESHOLD,
                               max_score: float | None = None, in_object_ratio: float = 0.8,
                               visible_ratio: float = 0.1, tracks_per_layer: tuple[int, int] = (1, 3)
                               ) -> dict[str, Any]:
    """One sample with every control present, in ``mode``, from a shapes-world clip (a seed, drawn
    with ``config``, or a ``make_sample`` result); ``generator`` drives the track selection."""
    clip = make_sample(world, config) if isinstance(world, int) else world
    masks = clip["layer_masks"]
    n, num_frames, _, height, width = masks.shape
    if n > capacity:
        raise LayerkitError(f"got {n} layers but the layer capacity is {capacity}.")
    points = clip["trajectories"]  # [n, F, P0, 2]
    visibility = clip["trajectory_visibility"]  # [n, F, P0]
    flat = torch.cat([points, visibility[..., None]], -1).permute(1, 0, 2, 3).reshape(num_frames, -1, 3)
    steps = (flat[1:, :, :2] - flat[:-1, :, :2]).norm(dim=-1)
    smooth = (steps <= min(height, width) / 2).all(0) if num_frames > 1 else torch.ones(flat.shape[1], dtype=torch.bool)
    candidates = torch.nonzero(smooth).squeeze(1)
    chosen = candidates[select_tracks(flat[:, candidates], masks[:, :, 0] > 0.5, generator, in_object_ratio,
                                      visible_ratio, *tracks_per_layer)]
    tracks = flat[:, chosen, :2]
    track_layer = assign_track_layers(tracks[0], masks[:, 0, 0] > 0.5)
    tracks, track_layer = tracks[:, track_layer >= 0], track_layer[track_layer >= 0]

    region = F.max_pool2d(masks.flatten(0, 1), 3, stride=1, padding=1).view_as(masks)
    lines = clip["sketches"] * region
    sketches = (1 - lines).clamp(0, 1).expand(-1, -1, 3, -1, -1)
    sample = build_sample(
        clip["blended"], masks, clip["motion_scores"], mode=mode, prompt=clip["prompt"], fps=fps, capacity=capacity,
        tracks=tracks, track_layer=track_layer, sketches=sketches, static_threshold=static_threshold,
        max_score=shapes_max_score(height, width) if max_score is None else max_score)
    sample["ground_truth"] = {
        "layer_masks": pad_per_layer(masks, capacity, 0.0),
        "tracks": pad_per_layer(points, capacity, 0.0),
        "track_visibility": pad_per_layer(visibility, capacity, 0.0),
        "motion_scores": pad_per_layer(clip["motion_scores"], capacity, -1.0),
        "static": pad_per_layer(clip["static"], capacity, False),
        "layer_validity": sample["layer_validity"].clone(),
        "prompts": list(clip["prompts"]) + [""] * (capacity - n),
    }
    return sample


def shapes_training_sample(world: int | dict[str, Any], generator: torch.Generator, *,
                           capacity: int = DEFAULT_CAPACITY, config: ShapesConfig | None = None,
                           **kwargs: Any) -> dict[str, Any]:
    """A training sample: the choices of ``controls.draw_training_choices`` (mode, dropout, one
    control per layer, flip), the sample built in that mode, the choices applied; everything
    from ``generator`` (choices first, then the track selection). ``kwargs`` go to
    :func:`shapes_layeranimate_sample`."""
    choices = draw_training_choices(generator, capacity)
    sample = shapes_layeranimate_sample(world, mode=choices.mode, generator=generator, capacity=capacity,
                                        config=config, **kwargs)
    return apply_training_choices(sample, choices)
