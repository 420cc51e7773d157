"""LayerAnimate's layers: layer capacity and validity, motion scores, frame decomposition and
motion-based assignment (paper sec. 4.1; code: IamCreateAI/LayerAnimate ``lvdm/data/dataset.py``,
``scripts/animate_Layer.py`` and ``AnimationPipeline._encode_controls``).

Letters: n given layers, N the layer capacity (4), F frames, K keyframes (1 for ``"i2v"``, 2 for
``"interpolate"``: the first and the last frame), B batch, C latent channels, H x W pixels,
h x w latent size.

- **Layer capacity / validity**: ``n <= N`` layers are padded with empty masks to N; ``layer_validity``
  marks the given ones (the fusion ignores the others).
- **Motion scores** come from optical flow in px/frame (the "raw" score). As the released data
  loader does it: a non-empty layer whose raw score is below ``static_threshold`` (the paper's eta,
  0.1) is *static* and its score becomes 0; then ``min(score, max_score) / max_score`` (s_max = 30)
  gives the normalised score in [0, 1]. Both thresholds are in raw px/frame. -1 is the
  normalised value for "no score control".
- **Frame decomposition**: ``layer_regions = mask * keyframe`` with the keyframe in [-1, 1], so
  pixels outside the mask are 0 in [-1, 1] space (mid-grey), exactly as the authors (their masks
  are bools multiplied onto the normalised frames). This is the VAE's input.
- **Motion-based assignment** runs on the VAE latents of the regions, see
  :func:`motion_based_assignment`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from layerkit.errors import LayerkitError, ShapeError

__all__ = [
    "DEFAULT_CAPACITY", "MAX_MOTION_SCORE", "MODES", "NO_MOTION_SCORE", "STATIC_THRESHOLD",
    "check_mode", "check_motion_scores", "keyframe_indices", "latent_masks", "layer_regions",
    "motion_based_assignment", "normalise_motion_scores", "pad_layers", "pad_per_layer",
]

MODES: tuple[str, ...] = ("i2v", "interpolate")
DEFAULT_CAPACITY = 4
#: raw px/frame below which a non-empty layer is static (paper v3 eta; the loader's ``static_motion_score``)
STATIC_THRESHOLD = 0.1
#: raw px/frame mapped to normalised score 1 (paper v3 s_max; the loader's ``max_motion_score``)
MAX_MOTION_SCORE = 30.0
#: normalised motion score meaning "no score control"
NO_MOTION_SCORE = -1.0


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is ``"i2v"`` or ``"interpolate"``, else raise ``LayerkitError``."""
    if mode not in MODES:
        raise LayerkitError(f"mode is {mode!r}; expected one of {', '.join(MODES)}.")
    return mode


def keyframe_indices(mode: str, num_frames: int) -> list[int]:
    """Frame index of each keyframe: ``[0]`` for i2v, ``[0, F-1]`` for interpolation."""
    if check_mode(mode) == "i2v":
        return [0]
    if num_frames < 2:
        raise LayerkitError(f"interpolation needs at least 2 frames, got {num_frames}.")
    return [0, num_frames - 1]


# ----------------------------------------------------------------------------- capacity and validity


def pad_layers(masks: torch.Tensor, capacity: int = DEFAULT_CAPACITY,
               frame_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-layer masks ``[n, F, 1, H, W]`` to ``[N, F, 1, H, W]`` (zeros) and return
    ``(masks, layer_validity [N] bool)`` with the first n layers valid.

    ``frame_size`` ``(H, W)``, when given, must match the masks' size.
    """
    if capacity < 1:
        raise LayerkitError(f"layer capacity must be at least 1, got {capacity}.")
    if masks.ndim != 5 or masks.shape[2] != 1:
        raise ShapeError(f"layer masks have shape {tuple(masks.shape)}, expected [n, F, 1, H, W].")
    n = masks.shape[0]
    if n > capacity:
        raise LayerkitError(f"got {n} layers but the layer capacity is {capacity}.")
    if frame_size is not None and tuple(masks.shape[-2:]) != tuple(frame_size):
        raise ShapeError(f"layer masks are {masks.shape[-1]}x{masks.shape[-2]} (W x H) but the frame is "
                         f"{frame_size[1]}x{frame_size[0]}.")
    validity = torch.zeros(capacity, dtype=torch.bool)
    validity[:n] = True
    return pad_per_layer(masks, capacity, 0), validity


def pad_per_layer(values: torch.Tensor, capacity: int, fill: float | bool) -> torch.Tensor:
    """Pad a per-layer tensor ``[n, ...]`` to ``[N, ...]`` with ``fill``."""
    n = values.shape[0]
    if n > capacity:
        raise LayerkitError(f"got {n} layers but the layer capacity is {capacity}.")
    pad = torch.full((capacity - n, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    return torch.cat([values, pad])


# ----------------------------------------------------------------------------- motion scores


def normalise_motion_scores(raw: torch.Tensor, nonempty: torch.Tensor | None = None,
                            static_threshold: float = STATIC_THRESHOLD,
                            max_score: float = MAX_MOTION_SCORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw motion scores ``[n]`` (px/frame, -1 = unknown) -> ``(normalised [n], static [n] bool)``.

    The released loader's rule: ``static = (raw < static_threshold) & nonempty``; static scores
    become 0; then ``min(raw, max_score) / max_score`` (skipped when ``max_score <= 0``). Both
    thresholds are raw px/frame. An unknown raw score (-1) gives -1 ("no score control") and is
    never static. ``nonempty`` ``[n]`` bool says which layers have a non-empty mask (all when None).
    """
    raw = torch.as_tensor(raw, dtype=torch.float32)
    if raw.ndim != 1:
        raise ShapeError(f"raw motion scores have shape {tuple(raw.shape)}, expected [n].")
    bad = torch.isnan(raw) | torch.isinf(raw) | ((raw < 0) & (raw != NO_MOTION_SCORE))
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise LayerkitError(f"raw motion score of layer {i} is {float(raw[i])}; expected a finite number of "
                            f"px/frame >= 0, or -1 for no score.")
    unknown = raw == NO_MOTION_SCORE
    nonempty = torch.ones_like(unknown) if nonempty is None else torch.as_tensor(nonempty, dtype=torch.bool)
    static = (raw < static_threshold) & nonempty & ~unknown
    scores = torch.where(static, torch.zeros_like(raw), raw)
    if max_score > 0:
        scores = scores.clamp_max(max_score) / max_score
    scores = torch.where(unknown, torch.full_like(scores, NO_MOTION_SCORE), scores)
    return scores, static


def check_motion_scores(scores: Sequence[float] | torch.Tensor, name: str = "motion_scores") -> torch.Tensor:
    """Normalised scores as a float32 tensor; each must lie in [0, 1] or be -1, else ``LayerkitError``."""
    values = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    for i, v in enumerate(values.tolist()):
        if not (v == NO_MOTION_SCORE or (not math.isnan(v) and 0.0 <= v <= 1.0)):
            raise LayerkitError(f"{name}[{i}] is {v}; expected a normalised score in [0, 1] or -1 for no score.")
    return values


# ----------------------------------------------------------------------------- frame decomposition


def layer_regions(keyframes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Frame decomposition: keyframes ``[..., K, 3, H, W]`` in [0, 1] and masks ``[..., N, K, 1, H, W]``
    -> regions ``[..., N, K, 3, H, W]`` in [-1, 1], 0 outside each mask (the VAE's input)."""
    if keyframes.ndim < 4 or masks.ndim != keyframes.ndim + 1:
        raise ShapeError(f"keyframes {tuple(keyframes.shape)} and masks {tuple(masks.shape)} should be "
                         f"[..., K, 3, H, W] and [..., N, K, 1, H, W].")
    if masks.shape[-4] != keyframes.shape[-4] or masks.shape[-2:] != keyframes.shape[-2:] or masks.shape[-3] != 1:
        raise ShapeError(f"masks {tuple(masks.shape)} do not match keyframes {tuple(keyframes.shape)} "
                         f"(expected [..., N, K, 1, H, W] with the keyframes' K, H, W).")
    frames = keyframes * 2 - 1
    return (masks > 0.5).to(frames.dtype) * frames.unsqueeze(-5)


def latent_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks ``[..., 1, H, W]`` to the latent ``size`` (h, w) as the authors: float,
    bilinear, ``align_corners=False``, no antialiasing -> ``[..., 1, h, w]``."""
    lead = masks.shape[:-3]
    flat = masks.reshape(-1, *masks.shape[-3:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def motion_based_assignment(region_latents: torch.Tensor, region_masks: torch.Tensor, layer_static: torch.Tensor,
                            num_frames: int, mode: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread keyframe layers over the F frames (paper sec. 4.1, ``_encode_controls``).

    region_latents ``[B, N, K, C, h, w]`` (VAE latents of :func:`layer_regions`), region_masks
    ``[B, N, K, 1, h, w]`` (:func:`latent_masks`), layer_static ``[B, N]`` bool, ``mode`` one
    string or one per sample. Returns ``(layer_latents [B, N, F, C, h, w], layer_latent_mask
    [B, N, F, 1, h, w])``; every frame not listed below holds zeros in both (mask channel 0 too):

    - i2v: frame 0 gets keyframe 0 of every layer; a static layer gets it on all F frames.
    - interpolate (K = 2): frame 0 gets keyframe 0 and frame F-1 keyframe 1 of every layer; a static
      layer gets keyframe 0 on frames 0 .. F//2-1 and keyframe 1 on F//2 .. F-1 (for odd F the second
      half is one frame longer; the authors' code only runs F even).
    """
    if region_latents.ndim != 6 or region_masks.ndim != 6:
        raise ShapeError(f"region latents {tuple(region_latents.shape)} and masks {tuple(region_masks.shape)} "
                         f"should be [B, N, K, C, h, w] and [B, N, K, 1, h, w].")
    b, n, k = region_latents.shape[:3]
    if region_masks.shape[:3] != (b, n, k) or region_masks.shape[3] != 1 or \
            region_masks.shape[-2:] != region_latents.shape[-2:]:
        raise ShapeError(f"region masks {tuple(region_masks.shape)} do not match latents "
                         f"{tuple(region_latents.shape)} (expected [B, N, K, 1, h, w]).")
    layer_static = torch.as_tensor(layer_static, dtype=torch.bool, device=region_latents.device)
    if tuple(layer_static.shape) != (b, n):
        raise ShapeError(f"layer_static has shape {tuple(layer_static.shape)}, expected [{b}, {n}].")
    modes = [mode] * b if isinstance(mode, str) else list(mode)
    if len(modes) != b:
        raise LayerkitError(f"got {len(modes)} modes for a batch of {b}.")
    for m in modes:
        check_mode(m)
        if m == "interpolate" and k < 2:
            raise LayerkitError(f"interpolation needs 2 keyframes per layer, got {k}.")
    if num_frames < (2 if "interpolate" in modes else 1):
        raise LayerkitError(f"num_frames is {num_frames}; expected at least 1 (2 for interpolation).")

    dtype = region_latents.dtype
    masks = region_masks.to(dtype)
    # source keyframe of each frame: -1 = zeros; shape [B, N, F]
    source = torch.full((b, n, num_frames), -1, dtype=torch.long, device=region_latents.device)
    half = num_frames // 2
    for i, m in enumerate(modes):
        static = layer_static[i]
        if m == "i2v":
            source[i, :, 0] = 0
            source[i, static] = 0
        else:
            source[i, :, 0] = 0
            source[i, :, -1] = k - 1
            source[i, static, :half] = 0
            source[i, static, half:] = k - 1
    index = source.clamp(min=0)
    keep = (source >= 0).to(dtype)[..., None, None, None]
    gather = index[..., None, None, None]
    latents = torch.gather(region_latents, 2, gather.expand(-1, -1, -1, *region_latents.shape[3:])) * keep
    mask = torch.gather(masks, 2, gather.expand(-1, -1, -1, *masks.shape[3:])) * keep
    return latents, mask
