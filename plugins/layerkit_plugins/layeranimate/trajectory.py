"""LayerAnimate's trajectory control (paper sec. 4.2): tracks -> a 3-channel map per layer and frame.

Behaviour of the authors' code (IamCreateAI/LayerAnimate ``lvdm/utils.py``
``generate_gaussian_template`` / ``generate_gaussian_heatmap``, the normalisation in
``scripts/animate_Layer.py`` and the track selection of ``lvdm/data/dataset.py``), written anew:

- **template**: a 200 x 200 isotropic Gaussian (sigma 40) centred at (100, 100), cut to the
  disc of radius 100 drawn by ``cv2.circle``, scaled so its peak is 255, stored as uint8 (truncated).
- **heatmap** (channel 0): for every in-frame point of layer l at (x, y), the template resized
  (``cv2.resize``, bilinear) to the clipped box ``[int(max(x-20, 0)), int(min(x+20, W-1)))`` x
  (same in y) is max-composited into layer l's map; boxes thinner than 1 px are skipped.
- **offsets** (channels 1-2): ``(x_next - x, y_next - y)`` written at pixel ``(int(y), int(x))``
  (later points overwrite; 0 on the last frame), then ``cv2.filter2D`` (default border: reflect-101)
  with the template resized to 41 x 41 and scaled so that its centre is 1.
- **normalisation**: heatmap ``/ 255 * 2 - 1`` (so -1 where no point is near, in particular on every
  layer without points), offsets divided by the largest offset length over *all* frames and layers
  plus 1e-5. Result ``[N, F, 3, H, W]``.

Maps are rendered at the target frame size from rescaled points, as the inference script does.
(The released loader renders at the clip's original size and then resizes and crops the maps, so
there the Gaussian covers 40 px of the *original* frame; at 320 x 512 training data the two agree.)

Tracks: ``[F, P, 2]`` (x, y) in pixels, pixel (row i, column j) at (x, y) = (j, i), as the
authors' ``trajectory.npz`` (key ``trajectory``, plus ``width``/``height`` of the frame they refer
to); the curation format is ``[F, P, 3]`` (x, y, visibility). :func:`fit_tracks` applies the
frames' ``Resize(min(H, W)) + CenterCrop(H, W)`` to points.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch

from layerkit.errors import LayerkitError, ShapeError

__all__ = [
    "BOX_SIDE", "TEMPLATE_SIGMA", "TEMPLATE_SIZE", "assign_track_layers", "fit_tracks", "gaussian_template",
    "load_tracks", "no_trajectory", "normalise_trajectory_maps", "offset_kernel", "raw_trajectory_maps",
    "resize_crop_geometry", "resized_size", "select_tracks", "trajectory_maps",
]

TEMPLATE_SIZE = 200
TEMPLATE_SIGMA = 40.0
BOX_SIDE = 20
_EPS = 1e-5


@lru_cache(maxsize=4)
def _template(size: int, sigma: float) -> np.ndarray:
    disc = cv2.circle(np.zeros((size, size), np.float32), (size // 2, size // 2), size // 2, 1, -1)
    i = np.arange(size, dtype=np.float64)
    d2 = ((i[:, None] - size / 2) ** 2 + (i[None, :] - size / 2) ** 2) / sigma**2
    gauss = (1 / 2 / np.pi / sigma**2 * np.exp(-0.5 * d2)).astype(np.float32) * disc
    gauss = (gauss / gauss.max()).astype(np.float32)
    out = (gauss / gauss.max() * 255).astype(np.uint8)
    out.setflags(write=False)
    return out


def gaussian_template(size: int = TEMPLATE_SIZE, sigma: float = TEMPLATE_SIGMA) -> np.ndarray:
    """The authors' Gaussian template: uint8 ``[size, size]``, peak 255 at (size/2, size/2), 0 outside
    the inscribed disc (read-only, cached)."""
    return _template(int(size), float(sigma))


def offset_kernel(side: int = BOX_SIDE) -> np.ndarray:
    """The offset smoothing kernel: the template resized to ``(2 side + 1)^2`` (bilinear) and scaled
    so its centre is 1 (float64)."""
    kernel = cv2.resize(gaussian_template() / 255, (2 * side + 1, 2 * side + 1))
    kernel /= np.sum(kernel)
    kernel /= kernel[side, side]
    return kernel


def _as_points(tracks, name: str = "tracks") -> np.ndarray:
    array = tracks.detach().cpu().numpy() if isinstance(tracks, torch.Tensor) else np.asarray(tracks)
    if array.ndim != 3 or array.shape[-1] not in (2, 3):
        raise ShapeError(f"{name} has shape {tuple(array.shape)}, expected [F, P, 2] (x, y) or [F, P, 3] "
                         f"(x, y, visibility).")
    if not np.isfinite(array).all():
        raise LayerkitError(f"{name} holds NaN or infinite coordinates.")
    return array.astype(np.float32, copy=False)


def raw_trajectory_maps(tracks, track_layer, height: int, width: int, capacity: int,
                        side: int = BOX_SIDE, visibility=None) -> torch.Tensor:
    """Unnormalised maps ``[F, N, 3, H, W]``: channel 0 the heatmap in 0..255, channels 1-2 the
    smoothed raw offsets in px (the authors' ``generate_gaussian_heatmap(..., offset=True)``).

    tracks ``[F, P, 2|3]`` (x, y[, visibility]) in pixels of the ``width`` x ``height`` frame;
    track_layer ``[P]`` the layer (0..N-1) of each point; points outside the frame are skipped on
    that frame. ``visibility`` ``[F, P]`` (optional): points below 0.5 are skipped too (the loader's
    ``consider_visibility``, off by default there and here).
    """
    points = _as_points(tracks)
    num_frames, num_points = points.shape[:2]
    layers = np.asarray(track_layer.cpu() if isinstance(track_layer, torch.Tensor) else track_layer,
                        dtype=np.int64).reshape(-1)
    if layers.shape[0] != num_points:
        raise ShapeError(f"track_layer has {layers.shape[0]} entries for {num_points} tracks.")
    bad = (layers < 0) | (layers >= capacity)
    if bad.any():
        raise LayerkitError(f"track_layer holds layer {int(layers[bad][0])}; expected 0..{capacity - 1}.")
    visible = None if visibility is None else np.asarray(visibility, dtype=np.float32)
    template = gaussian_template()
    kernel = offset_kernel(side)
    maps = np.zeros((num_frames, capacity, height, width, 3), dtype=np.float32)
    for f in range(num_frames):
        for p in range(num_points):
            x, y = points[f, p, 0], points[f, p, 1]
            if x < 0 or y < 0 or x >= width or y >= height or (visible is not None and visible[f, p] < 0.5):
                continue
            x1, x2 = int(max(x - side, 0)), int(min(x + side, width - 1))
            y1, y2 = int(max(y - side, 0)), int(min(y + side, height - 1))
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            img = maps[f, layers[p]]
            patch = cv2.resize(template, (x2 - x1, y2 - y1))
            img[y1:y2, x1:x2, 0] = np.maximum(img[y1:y2, x1:x2, 0], patch)
            nx, ny = (points[f + 1, p, 0], points[f + 1, p, 1]) if f < num_frames - 1 else (x, y)
            img[int(y), int(x), 1] = nx - x
            img[int(y), int(x), 2] = ny - y
        for layer in range(capacity):
            offsets = maps[f, layer, :, :, 1:]
            if offsets.any():
                maps[f, layer, :, :, 1:] = cv2.filter2D(np.ascontiguousarray(offsets), -1, kernel)
    return torch.from_numpy(maps).permute(0, 1, 4, 2, 3).contiguous()


def normalise_trajectory_maps(raw: torch.Tensor) -> torch.Tensor:
    """``[F, N, 3, H, W]`` raw maps -> ``[N, F, 3, H, W]``: heatmap ``/255*2-1``, offsets divided by
    the largest offset length over all frames and layers + 1e-5 (the authors' normalisation)."""
    if raw.ndim != 5 or raw.shape[2] != 3:
        raise ShapeError(f"raw trajectory maps have shape {tuple(raw.shape)}, expected [F, N, 3, H, W].")
    raw = raw.float()
    heat, offset = raw[:, :, :1], raw[:, :, 1:]
    radius = torch.sqrt(offset[:, :, 0:1] ** 2 + offset[:, :, 1:2] ** 2).max()
    out = torch.cat([heat / 255.0 * 2 - 1, offset / (radius + _EPS)], dim=2)
    return out.transpose(0, 1).contiguous()


def trajectory_maps(tracks, track_layer, height: int, width: int, capacity: int, side: int = BOX_SIDE,
                    visibility=None) -> torch.Tensor:
    """Tracks ``[F, P, 2|3]`` and their layers ``[P]`` -> the control map ``[N, F, 3, H, W]``
    (heatmap in [-1, 1], -1 = no point; offsets normalised to length <= 1)."""
    raw = raw_trajectory_maps(tracks, track_layer, height, width, capacity, side, visibility)
    return normalise_trajectory_maps(raw)


def no_trajectory(capacity: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The "no trajectory" map ``[N, F, 3, H, W]``: heatmap -1, offsets 0."""
    out = torch.zeros(capacity, num_frames, 3, height, width)
    out[:, :, 0] = -1
    return out


# ----------------------------------------------------------------------------- files and geometry


def resized_size(src_height: int, src_width: int, short: int) -> tuple[int, int]:
    """``(height, width)`` after torchvision's ``Resize(short)``: the shorter side becomes ``short``,
    the longer ``int(short * longer / shorter)``."""
    if src_width <= src_height:
        return int(short * src_height / src_width), short
    return short, int(short * src_width / src_height)


def resize_crop_geometry(src_height: int, src_width: int, height: int, width: int
                         ) -> tuple[float, int, int]:
    """What ``Resize(min(H, W)) + CenterCrop(H, W)`` does to a ``src_width`` x ``src_height`` frame:
    ``(scale, left, top)`` so that a point maps to ``(x * scale - left, y * scale - top)``.

    ``scale`` is the authors' ``min(H, W) / shorter side``; ``left``/``top`` the crop offsets of the
    resized frame (torchvision's sizes and rounding; negative where the crop pads). Where the crop
    pads by an odd amount, the authors' point shift ``round((new - size) / 2)`` can be one pixel off
    their own image; this follows the image.
    """
    short = min(height, width)
    new_h, new_w = resized_size(src_height, src_width, short)
    scale = short / min(src_width, src_height)
    if new_w >= width:
        left = int(round((new_w - width) / 2.0))
    else:  # CenterCrop pads (width - new_w) // 2 on the left
        left = -((width - new_w) // 2)
    if new_h >= height:
        top = int(round((new_h - height) / 2.0))
    else:
        top = -((height - new_h) // 2)
    return scale, left, top


def fit_tracks(tracks, src_height: int, src_width: int, height: int, width: int) -> np.ndarray:
    """Apply the frames' resize + centre crop to tracks ``[F, P, 2|3]`` given in pixels of a
    ``src_width`` x ``src_height`` frame (visibility, if any, is kept)."""
    points = _as_points(tracks).copy()
    scale, left, top = resize_crop_geometry(src_height, src_width, height, width)
    xy = (points[..., :2].astype(np.float64) * scale).astype(np.float32)
    xy[..., 0] -= np.float32(left)
    xy[..., 1] -= np.float32(top)
    points[..., :2] = xy
    return points


def load_tracks(path: str | os.PathLike, num_frames: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """Read a tracks ``.npz``: ``(points [F, P, 2] float32, visibility [F, P] or None, (height, width))``.

    Accepted keys: the authors' demo file (``trajectory`` [F, P, 2] in pixels, ``width``, ``height``)
    or the curation format (``tracks`` [F, P, 3] = x, y, visibility, with ``width`` and ``height``).
    F must equal ``num_frames`` when given. Points may leave the ``width`` x ``height`` frame (the
    authors' demos 1, 3 and 5 have tracks that do; such points are skipped on those frames), but
    every track must lie inside it on at least one frame.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise LayerkitError(f"could not read '{path}' as an .npz file: {exc}.") from None
    key = "trajectory" if "trajectory" in content else "tracks" if "tracks" in content else None
    if key is None:
        raise LayerkitError(f"'{path}' has keys {sorted(content)}; expected 'trajectory' [F, P, 2] (or 'tracks' "
                            f"[F, P, 3]) with 'width' and 'height'.")
    for size_key in ("width", "height"):
        value = content.get(size_key)
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.number) or \
                not float(value.reshape(())) >= 1 or float(value.reshape(())) != int(value.reshape(())):
            raise LayerkitError(f"'{path}' needs an integer '{size_key}' >= 1 (the frame size the points refer "
                                f"to), got {None if value is None else value.tolist()}.")
    width, height = int(content["width"].reshape(())), int(content["height"].reshape(()))
    array = content[key]
    want = 2 if key == "trajectory" else 3
    if array.ndim != 3 or array.shape[-1] != want or not np.issubdtype(array.dtype, np.number):
        layout = "[F, P, 2] (x, y)" if want == 2 else "[F, P, 3] (x, y, visibility)"
        raise ShapeError(f"'{path}' key '{key}' has shape {tuple(array.shape)}, expected {layout}.")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise LayerkitError(f"'{path}' key '{key}' holds NaN or infinite values.")
    if num_frames is not None and array.shape[0] != num_frames:
        raise LayerkitError(f"'{path}' has {array.shape[0]} frames of tracks, expected {num_frames}.")
    points = np.ascontiguousarray(array[..., :2])
    inside = (points[..., 0] >= 0) & (points[..., 1] >= 0) & (points[..., 0] < width) & (points[..., 1] < height)
    never = np.flatnonzero(~inside.any(axis=0))
    if never.size:
        p = int(never[0])
        raise LayerkitError(f"'{path}': track {p} never lies inside the {width}x{height} frame (first point at "
                            f"({points[0, p, 0]:.1f}, {points[0, p, 1]:.1f})).")
    visibility = np.ascontiguousarray(array[..., 2]) if want == 3 else None
    return points, visibility, (height, width)


# ----------------------------------------------------------------------------- track selection


def _index_map(masks: torch.Tensor, fill: int) -> torch.Tensor:
    """[M, F, H, W] bool -> [F, H, W] long: the last mask holding each pixel, ``fill`` where none."""
    out = torch.full(masks.shape[1:], fill, dtype=torch.long)
    for i, mask in enumerate(masks):
        out[mask] = i
    return out


def select_tracks(tracks, object_masks: torch.Tensor, generator: torch.Generator,
                  in_object_ratio: float = 0.8, visible_ratio: float = 0.1,
                  min_per_object: int = 1, max_per_object: int = 3) -> torch.Tensor:
    """The released loader's track selection -> indices ``[P']`` (long) of the kept tracks.

    tracks ``[F, P, 3]`` (x, y, visibility) in pixels of the masks' frame; object_masks
    ``[O, F, H, W]`` bool (the masklets *before* merging; where several hold a pixel the last wins).
    A track belongs to the object under its first point; it is kept when more than
    ``in_object_ratio`` of its in-frame points lie in that object and its mean visibility exceeds
    ``visible_ratio``. Per object (ascending id), ``randint(min, max)`` tracks are drawn without
    replacement with ``torch.multinomial`` weighted by the track's mean displacement per frame; an
    object with no more candidates than that keeps them all.

    Differences from the loader: the count comes from ``generator`` too (the loader uses numpy's
    global RNG); a track starting on a pixel no mask holds is dropped (the loader's maps default
    to object 0, the background complement, which covers such pixels there); when fewer candidates
    move than must be drawn, a tiny uniform weight is added (``torch.multinomial`` would raise).
    """
    points = torch.as_tensor(_as_points(tracks))
    if points.shape[-1] != 3:
        raise ShapeError(f"tracks have shape {tuple(points.shape)}, expected [F, P, 3] (x, y, visibility).")
    masks = torch.as_tensor(object_masks).bool()
    if masks.ndim != 4 or masks.shape[1] != points.shape[0]:
        raise ShapeError(f"object masks have shape {tuple(masks.shape)}, expected [O, F, H, W] with "
                         f"F = {points.shape[0]} (the tracks' frames).")
    if not 1 <= min_per_object <= max_per_object:
        raise LayerkitError(f"tracks per object must be a range 1 <= min <= max, got {min_per_object}..{max_per_object}.")
    num_objects, num_frames, height, width = masks.shape
    object_map = _index_map(masks, num_objects)  # num_objects = "no object"
    x, y = points[..., 0], points[..., 1]
    inside = (x >= 0) & (y >= 0) & (x < width) & (y < height)
    owner = torch.full(points.shape[:2], -1, dtype=torch.long)
    f_idx, p_idx = torch.nonzero(inside, as_tuple=True)
    owner[f_idx, p_idx] = object_map[f_idx, y[f_idx, p_idx].long(), x[f_idx, p_idx].long()]
    first = owner[0]
    ratio = (owner == first[None]).sum(0) / (owner != -1).sum(0).clamp(min=1)
    keep = (ratio > in_object_ratio) & (first >= 0) & (first < num_objects)
    keep &= points[..., 2].mean(0) > visible_ratio
    retained = torch.nonzero(keep).squeeze(1)
    motion = (points[1:, :, :2] - points[:-1, :, :2]).norm(dim=-1).mean(0) if num_frames > 1 \
        else torch.zeros(points.shape[1])
    chosen = []
    for obj in torch.unique(first[retained]).tolist():
        candidates = retained[first[retained] == obj]
        count = int(torch.randint(min_per_object, max_per_object + 1, (1,), generator=generator))
        if len(candidates) > count:
            weights = motion[candidates].double()
            if int((weights > 0).sum()) < count:
                weights = weights + 1e-6 * max(float(weights.max()), 1.0)
            candidates = candidates[torch.multinomial(weights, count, replacement=False, generator=generator)]
        chosen.append(candidates)
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def assign_track_layers(first_points, layer_masks: torch.Tensor) -> torch.Tensor:
    """Layer of each track ``[P]`` (long) from its first point ``[P, 2]`` (x, y) and the layer masks
    on that frame ``[N, H, W]`` (the last layer holding the pixel wins; -1 outside every mask or the
    frame)."""
    pts = torch.as_tensor(np.asarray(first_points, dtype=np.float32)).reshape(-1, 2)
    masks = torch.as_tensor(layer_masks).bool()
    if masks.ndim != 3:
        raise ShapeError(f"layer masks have shape {tuple(masks.shape)}, expected [N, H, W] (the first frame).")
    layer_map = _index_map(masks[:, None], -1)[0]
    height, width = layer_map.shape
    out = torch.full((pts.shape[0],), -1, dtype=torch.long)
    ok = (pts[:, 0] >= 0) & (pts[:, 1] >= 0) & (pts[:, 0] < width) & (pts[:, 1] < height)
    out[ok] = layer_map[pts[ok, 1].long(), pts[ok, 0].long()]
    return out
