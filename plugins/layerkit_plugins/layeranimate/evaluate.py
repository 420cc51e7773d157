"""What LayerAnimate's controls promise, measured on shapes-world samples against their ground truth.

A sample's ``ground_truth`` (``shapes.py``) holds per layer the true masks on every frame, the
tracked points (point 0 of a sprite is its centre), the raw motion scores (px/frame), the static
flags, the validity and the prompts ("a red circle moving left"). The generated video is read with
no model: a sprite is located in each generated frame by its colour (the median colour of its region
on the true first frame), the background's motion by a sub-pixel circular shift search.

Per sample (then averaged over the samples that have them):

- ``frame_error`` / ``keyframe_error``: mean absolute error of the video against the true clip, on
  all frames / on the given keyframes;
- ``trajectory_error`` (px): for every sprite layer with a trajectory control, the distance between
  the sprite's colour centroid in the generated frame and the commanded track (the sprite's centre
  on that frame), averaged over frames 1..F-1 where the sprite is found and where it is clean in the
  truth (at least 80% of its largest visible area: not hidden by another sprite or the border, so
  that its visible centroid is its centre); ``trajectory_found``: the share of those frames where the
  sprite is found at all (colour mass at least 40% of its true area);
- ``static_drift``: for layers marked static (``layer_static``), the mean absolute change of the
  generated pixels against the generated frame 0, over the pixels the layer covers on every true
  frame (eroded by 1 px), on [0, 1] RGB; ``static_error``: the same pixels against the truth
  (a frozen grey video has no drift but a large error);
- ``sprite_found``, ``shape_kept``, ``sprite_identity``: for every sprite, over its clean frames, the
  share where it is found by its colour, where the found blob is classified as its true shape
  (``layerkit.data.evaluate.classify_shape``), and where both hold.

Over the batch (the motion-score promise needs several layers):

- ``motion_rank_corr``: Spearman rank correlation between the generated motion of every valid layer
  (px/frame: a sprite's net centroid displacement over the frames it is found, the background's
  mean shift between consecutive frames; backgrounds of stripes or waves, whose motion along their
  lines cannot be seen, are left out) and its true raw motion score, the quantity the motion-score
  control commands (s / s_max); ``motion_rank_corr_scored``: the same over the layers that carry a
  motion-score control in the batch (when at least 4 do); ``motion_error``: mean absolute difference
  in px/frame over all valid layers.

On the true clips every figure is (near) perfect: errors and drift ~0, found/identity 1,
correlations 1 (``tests/test_toy_layeranimate.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.data.evaluate import classify_shape, summarise
from layerkit.data.shapes import COLOURS, SHAPES

#: RGB distance at which a pixel stops counting as the sprite's colour (vocabulary colours are 1 apart;
#: two-colour background mixtures stay at least 0.707 from any other vocabulary colour)
COLOUR_RADIUS = 0.6
#: found: colour mass at least this share of the sprite's true visible area
FOUND_SHARE = 0.4
#: clean frame in the truth: visible area at least this share of the sprite's largest
CLEAN_SHARE = 0.8
MIN_REGION = 4  # px: static regions smaller than this are skipped
#: px/frame: generated motion is rounded to this before ranking (a still layer measures ~0.001)
MOTION_STEP = 0.05
#: background textures whose motion along their lines cannot be seen: left out of the motion figures
APERTURE_TEXTURES = ("stripes", "gradient")

__all__ = ["evaluate_layers", "layer_motion", "locate_colour", "sample_rows", "spearman"]


def sprite_words(prompt: str) -> tuple[str, str] | None:
    """(colour, shape) of a shapes-world sprite prompt ("a red circle moving left"), else None."""
    words = prompt.split()
    if len(words) >= 3 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES:
        return words[1], words[2]
    return None


def colour_weights(video: torch.Tensor, colour: torch.Tensor, radius: float = COLOUR_RADIUS) -> torch.Tensor:
    """[F, 3, H, W] -> [F, H, W]: 1 at the colour, falling linearly to 0 at ``radius`` RGB distance."""
    d = (video.float() - colour.view(1, 3, 1, 1).float()).norm(dim=1)
    return (1 - d / radius).clamp(0, 1)


def locate_colour(video: torch.Tensor, colour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The colour blob per frame: centroid (x, y) [F, 2], mass [F] (px) and binary mask [F, 1, H, W]."""
    w = colour_weights(video, colour)
    f, h, width = w.shape
    mass = w.sum((1, 2))
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    centre = torch.stack([(w * xs).sum((1, 2)), (w * ys).sum((1, 2))], 1) / mass.clamp_min(1e-6).unsqueeze(1)
    return centre, mass, (w >= 0.25).float().unsqueeze(1)


def reference_colour(keyframe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Median colour [3] of ``keyframe`` [3, H, W] under ``mask`` [1, H, W] (None when empty)."""
    inside = mask[0] > 0.5
    if int(inside.sum()) < 1:
        return None
    return keyframe[:, inside].float().median(dim=1).values


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """[..., H, W] {0, 1} -> eroded by one pixel (3x3)."""
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return (-F.max_pool2d(-flat, 3, stride=1, padding=1)).reshape(mask.shape)


def _shift(frames: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Circular sub-pixel shift of [3, H, W] by every (dx, dy) [S] (Fourier phase): [S, 3, H, W]
    with out(x) = frames(x - d)."""
    _, h, w = frames.shape
    spectrum = torch.fft.fft2(frames.float())
    ky = torch.fft.fftfreq(h).view(1, 1, h, 1)
    kx = torch.fft.fftfreq(w).view(1, 1, 1, w)
    phase = torch.exp(-2j * math.pi * (kx * dx.view(-1, 1, 1, 1) + ky * dy.view(-1, 1, 1, 1)))
    return torch.fft.ifft2(spectrum.unsqueeze(0) * phase).real


def background_shift(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor, reach: float = 3.0) -> torch.Tensor:
    """(dx, dy) that best maps frame ``a`` onto frame ``b`` ([3, H, W]) on ``region`` [H, W] (masked L1):
    an integer search within ``reach`` px, then a 1/8 px refinement (the texture wraps on the frame)."""
    best = torch.zeros(2)
    for step, span in ((1.0, reach), (0.125, 0.5)):
        offsets = torch.arange(-span, span + 1e-6, step)
        grid = torch.cartesian_prod(offsets, offsets) + best  # [S, 2] (dx, dy)
        shifted = _shift(a, grid[:, 0], grid[:, 1])
        cost = ((shifted - b.float().unsqueeze(0)).abs().sum(1) * region).sum((1, 2))
        best = grid[int(cost.argmin())]
    return best


def layer_motion(video: torch.Tensor, gt: dict[str, Any], n: int, colour: torch.Tensor | None) -> float | None:
    """Generated motion of layer ``n`` in px/frame: a sprite's net centroid displacement per frame over
    the frames where it is found, the background's mean shift between consecutive frames."""
    f = video.shape[0]
    if f < 2:
        return None
    masks = gt["layer_masks"][n].float()  # [F, 1, H, W]
    if n == 0 or colour is None:  # the background (a texture): shift search on its region
        if any(word in gt["prompts"][n].split() for word in APERTURE_TEXTURES):
            return None  # stripes and waves: a shift along them is invisible (the aperture problem)
        region = _erode(masks[:, 0])
        shifts = []
        for t in range(f - 1):
            both = region[t] * region[t + 1]
            if float(both.sum()) >= 16:
                shifts.append(background_shift(video[t], video[t + 1], both))
        return float(torch.stack(shifts).mean(0).norm()) if shifts else None
    centre, mass, _ = locate_colour(video, colour)
    area = masks.sum((1, 2, 3))
    found = torch.nonzero(mass >= FOUND_SHARE * area.max().clamp_min(1)).flatten()
    if found.numel() < 2:
        return 0.0 if found.numel() else None
    first, last = int(found[0]), int(found[-1])
    return float((centre[last] - centre[first]).norm()) / (last - first)


def sample_rows(video: torch.Tensor, sample: dict[str, Any]) -> tuple[dict[str, float], list[tuple[float, float, bool]]]:
    """One sample's figures, and per valid layer (generated motion, true raw score, has a score control)."""
    gt = sample["ground_truth"]
    truth = sample["video"].float()
    video = video.float()
    f = video.shape[0]
    row: dict[str, float] = {"frame_error": (video - truth).abs().mean().item()}
    frames = [0, f - 1] if sample["mode"] == "interpolate" else [0]
    row["keyframe_error"] = (video[frames] - truth[frames]).abs().mean().item()
    validity = gt["layer_validity"].bool()
    static = sample["layer_static"].bool()
    trajectory = sample["trajectory"]
    scores = sample["motion_scores"]
    traj_err, traj_found, drifts, static_err = [], [], [], []
    found_all, shape_all, ident_all = [], [], []
    motions: list[tuple[float, float, bool]] = []
    for n in range(validity.shape[0]):
        if not bool(validity[n]):
            continue
        masks = gt["layer_masks"][n].float()  # [F, 1, H, W]
        words = sprite_words(gt["prompts"][n]) if n > 0 else None
        colour = reference_colour(truth[0], masks[0]) if words else None
        if bool(static[n]):
            region = _erode(masks[:, 0].prod(0))  # covered on every true frame
            if float(region.sum()) >= MIN_REGION:
                weight = region.view(1, 1, *region.shape)
                denom = float(region.sum()) * 3 * (f - 1)
                if f > 1:
                    drifts.append(float(((video[1:] - video[:1]).abs() * weight).sum()) / denom)
                    static_err.append(float(((video[1:] - truth[1:]).abs() * weight).sum()) / denom)
        motion = layer_motion(video, gt, n, colour)
        if motion is not None:
            motions.append((motion, float(gt["motion_scores"][n]), bool(scores[n] >= 0)))
        if colour is None:
            continue
        area = masks.sum((1, 2, 3))
        clean = area >= CLEAN_SHARE * area.max().clamp_min(1)
        centre, mass, blob = locate_colour(video, colour)
        found = mass >= FOUND_SHARE * area.clamp_min(1)
        if bool((trajectory[n][:, 0] > -1).any()):  # the layer has a trajectory control
            track = gt["tracks"][n][:, 0].float()  # [F, 2]: the sprite's centre
            use = clean.clone()
            use[0] = False
            if bool(use.any()):
                traj_found.append(float((found & use).sum()) / float(use.sum()))
                ok = use & found
                if bool(ok.any()):
                    traj_err.append(float((centre[ok] - track[ok]).norm(dim=1).mean()))
        kept = [classify_shape(blob[t:t + 1]) == words[1] if bool(found[t]) else False
                for t in range(f) if bool(clean[t])]
        found_clean = [bool(found[t]) for t in range(f) if bool(clean[t])]
        if kept:
            found_all.append(sum(found_clean) / len(found_clean))
            shape_all.append(sum(kept) / len(kept))
            ident_all.append(sum(k and c for k, c in zip(kept, found_clean, strict=True)) / len(kept))
    for key, values in (("trajectory_error", traj_err), ("trajectory_found", traj_found), ("static_drift", drifts),
                        ("static_error", static_err), ("sprite_found", found_all), ("shape_kept", shape_all),
                        ("sprite_identity", ident_all)):
        if values:
            row[key] = sum(values) / len(values)
    return row, motions


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); 0 when only ``x`` is constant (no
    agreement), NaN when ``y`` is."""
    def ranks(values: list[float]) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        for value in torch.unique(v):  # ties: mean rank
            same = v == value
            r[same] = r[same].mean()
        return r

    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    if float(ry.norm()) == 0:
        return float("nan")
    if float(rx.norm()) == 0:
        return 0.0
    return float((rx * ry).sum()) / float(rx.norm() * ry.norm())


def _each_sample(outputs: list[dict[str, torch.Tensor]],
                 batch: dict[str, Any]) -> list[tuple[dict[str, float], list[tuple[float, float, bool]]]]:
    """:func:`sample_rows` of every output against its sample of the collated batch."""
    keys = ("video", "mode", "ground_truth", "layer_static", "trajectory", "motion_scores")
    return [sample_rows(out["video"], {k: batch[k][i] for k in keys}) for i, out in enumerate(outputs)]


def per_sample_rows(outputs: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> list[dict[str, float]]:
    """Each sample's own figures (those :func:`evaluate_layers` averages; its motion correlations
    need the whole batch)."""
    return [row for row, _ in _each_sample(outputs, batch)]


def evaluate_layers(outputs: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> dict[str, float]:
    """The figures of ``outputs`` (each ``video`` [F, 3, H, W] in [0, 1]) against the batch's ground truth."""
    figures = _each_sample(outputs, batch)
    motions = [m for _, layer_motions in figures for m in layer_motions]
    metrics = summarise([row for row, _ in figures])
    if len(motions) >= 3:
        measured, true, scored = zip(*motions, strict=True)
        measured = [round(m / MOTION_STEP) * MOTION_STEP for m in measured]  # the measure's resolution
        motions = [(m, b, c) for m, (_, b, c) in zip(measured, motions, strict=True)]
        metrics["motion_rank_corr"] = spearman(list(measured), list(true))
        metrics["motion_error"] = sum(abs(a - b) for a, b in zip(measured, true, strict=True)) / len(measured)
        picked = [(a, b) for a, b, s in motions if s]
        if len(picked) >= 4:
            metrics["motion_rank_corr_scored"] = spearman([a for a, _ in picked], [b for _, b in picked])
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
