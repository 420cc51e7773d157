"""Element segmentation: the paper's key-frame loop (seed 001 sec. 3.1) and its classical default.

The loop, shared by every segmenter: key frames every ``key_interval`` frames; the first key
frame's automatic masks become elements, propagated to all frames (masklets); at each later key
frame the masks that the current masklets do not already cover (``new = masks(K_i) minus T_{t_i}``)
are new elements, propagated forward and backward and added; a key frame with nothing new
changes nothing. Masklets are kept as one label map ``int32 [F, H, W]`` (0 = no element, the
background complement; ``i > 0`` = element i), so they never overlap.

``colour_motion`` (default, CPU, no weights) is built for the flat colours of animation:
- masks on a frame = connected regions of one palette colour (the palette: colours that cover at
  least ``min_colour_share`` of the key frames, closer ones merged), each pixel taking its nearest
  palette colour after a ``median`` filter (so an anti-aliased edge falls on the side its
  coverage favours, and compression noise does not make regions of its own);
- propagation = warping the previous frame's labels along the flow, then re-labelling: each
  colour region takes the element its warped pixels of the same colour mostly hold;
- regions thinner than ``line_width`` px or smaller than ``min_area`` (outlines, anti-aliasing)
  are not elements; they take the label of the nearest element; elements smaller than
  ``min_element_share`` of the frame join the neighbour they share the longest border with;
- motion: elements of one colour whose motion scores agree are one element (a texture's many
  small regions of one colour, whose scores alone are noisy).
Motion-based merging (merge.py) then groups the elements into layers.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from scipy import ndimage

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.flow import Flow, warp_backward
from layerkit_plugins.curation.merge import masklet_scores, ward_groups
from layerkit_plugins.curation.steps import check_frames

#: propagate(seed labels [H, W] at frame k, k) -> labels [F, H, W] of those elements in every frame
Propagate = Callable[[np.ndarray, int], np.ndarray]
#: masks(frame index) -> list of bool [H, W] candidate element masks on that key frame
Masks = Callable[[int], list[np.ndarray]]


def key_frame_loop(num_frames: int, shape: tuple[int, int], masks: Masks, propagate: Propagate,
                   key_interval: int = 4, new_overlap: float = 0.5) -> np.ndarray:
    """The paper's iterative element segmentation, with any mask generator and propagator.

    A key-frame mask is new when less than ``new_overlap`` of it is covered by the current
    masklets. Returns labels ``int32 [F, H, W]``.
    """
    if key_interval < 1:
        raise LayerkitError(f"segmenter.key_interval must be at least 1, got {key_interval}.")
    labels = np.zeros((num_frames, *shape), np.int32)
    next_id = 1
    for k in range(0, num_frames, key_interval):
        covered = labels[k] > 0
        seed = np.zeros(shape, np.int32)
        for mask in masks(k):
            area = int(mask.sum())
            if area == 0 or covered[mask].sum() >= new_overlap * area:
                continue
            seed[mask & ~covered & (seed == 0)] = next_id
            next_id += 1
        if not seed.any():
            continue  # nothing new: masklets stay as they are
        added = propagate(seed, k)
        labels = np.where(labels == 0, added, labels)
    return labels


def build_palette(frames: np.ndarray, min_share: float = 0.005, merge_distance: float = 64.0,
                  bins: int = 16) -> np.ndarray:
    """Flat colours of ``frames`` [K, H, W, 3]: float32 [P, 3] (RGB 0..255), most common first."""
    pixels = frames.reshape(-1, 3)
    step = 256 // bins
    codes = (pixels // step).astype(np.int32) @ np.array([bins * bins, bins, 1])
    counts = np.bincount(codes, minlength=bins**3)
    sums = np.stack([np.bincount(codes, weights=pixels[:, c].astype(np.float64), minlength=bins**3)
                     for c in range(3)], -1)
    order = np.argsort(-counts, kind="stable")
    palette: list[np.ndarray] = []
    for code in order:
        if counts[code] < max(1.0, min_share * len(pixels)):
            break
        colour = sums[code] / counts[code]
        if all(np.linalg.norm(colour - p) > merge_distance for p in palette):
            palette.append(colour)
    if not palette:  # noise everywhere: fall back to the most common bin
        palette.append(sums[order[0]] / counts[order[0]])
    return np.asarray(palette, np.float32)


def quantise(frames: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Nearest palette colour of every pixel: int32 [F, H, W]."""
    f, h, w = frames.shape[:3]
    pixels = frames.reshape(-1, 3).astype(np.float32)
    best = np.zeros(len(pixels), np.int32)
    best_d = np.full(len(pixels), np.inf, np.float32)
    for i, colour in enumerate(palette):
        d = ((pixels - colour) ** 2).sum(-1)
        closer = d < best_d
        best[closer], best_d[closer] = i, d[closer]
    return best.reshape(f, h, w)


def colour_regions(colour: np.ndarray, min_area: int, line_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Connected regions of one colour in one frame ``colour`` [H, W].

    Returns region ids ``int32 [H, W]`` (1.., 0 = a fragment: thinner than ``line_width`` or
    smaller than ``min_area``) and the palette colour of each id (index 0 unused).
    """
    regions = np.zeros(colour.shape, np.int32)
    colours = [-1]
    for c in np.unique(colour):
        n, comp = cv2.connectedComponents((colour == c).astype(np.uint8), connectivity=4)
        if n <= 1:
            continue
        areas = np.bincount(comp.ravel(), minlength=n)
        # half-width of each region: its largest distance to the outside
        dist = cv2.distanceTransform((comp > 0).astype(np.uint8), cv2.DIST_L2, 3)
        width = ndimage.maximum(dist, comp, index=np.arange(n)) * 2.0
        for j in range(1, n):
            if areas[j] >= min_area and width[j] > line_width:
                colours.append(int(c))
                regions[comp == j] = len(colours) - 1
    return regions, np.asarray(colours, np.int32)


def fill_fragments(labels: np.ndarray, fragment: np.ndarray) -> np.ndarray:
    """Give each fragment pixel (bool [H, W]) the label of the nearest non-fragment pixel."""
    if not fragment.any() or fragment.all():
        return labels
    _, (iy, ix) = ndimage.distance_transform_edt(fragment, return_indices=True)
    return labels[iy, ix]


def _relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    lut = np.zeros(int(ids.max()) + 1, np.int32)
    lut[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1, dtype=np.int32)
    return lut[labels]


def _adjacency(labels: np.ndarray, n: int) -> np.ndarray:
    """Shared border length of every pair of elements, int64 [n, n] (symmetric, over all frames)."""
    counts = np.zeros(n * n, np.int64)
    for a, b in ((labels[:, :, :-1], labels[:, :, 1:]), (labels[:, :-1, :], labels[:, 1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        counts += np.bincount(a[touch].astype(np.int64) * n + b[touch], minlength=n * n)
    counts = counts.reshape(n, n)
    return counts + counts.T


def absorb_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Elements covering less than ``min_area`` px per frame on average join the neighbour they
    share the longest border with, smallest first (``labels`` int32 [F, H, W]; 0 stays 0)."""
    labels = _relabel_consecutive(labels)
    n = int(labels.max()) + 1
    if n <= 2:
        return labels
    area = np.bincount(labels.ravel(), minlength=n).astype(np.float64) / labels.shape[0]
    border = _adjacency(labels, n)
    border[0], border[:, 0] = 0, 0
    parent = np.arange(n)
    alive = np.arange(n) > 0
    while True:
        small = np.flatnonzero(alive & (area < min_area) & (border.sum(1) > 0))
        if not len(small):
            break
        a = int(small[np.argmin(area[small])])
        b = int(np.argmax(border[a]))
        parent[parent == a] = b
        area[b] += area[a]
        border[b] += border[a]
        border[:, b] += border[:, a]
        border[a], border[:, a], border[b, b] = 0, 0, 0
        alive[a] = False
    return _relabel_consecutive(parent[labels].astype(np.int32))


def merge_same_colour(labels: np.ndarray, colour: np.ndarray, magnitude: np.ndarray, tolerance: float) -> np.ndarray:
    """Elements of one palette colour whose motion scores agree become one element: per colour, the
    merging rule of merge.py without a capacity, stopping at Ward distance ``tolerance`` (px/frame).

    A texture (stripes, a checkerboard, dots) falls apart into many small regions of a few
    colours; each region alone has a noisy score, the regions of one colour together do not.
    """
    labels = _relabel_consecutive(labels)
    n = int(labels.max()) + 1
    palette = int(colour.max()) + 1
    table = np.bincount((labels.astype(np.int64) * palette + colour).ravel(), minlength=n * palette)
    element_colour = table.reshape(n, palette).argmax(1)
    scores = masklet_scores(labels, magnitude)
    parent = np.arange(n)
    for c in np.unique(element_colour[1:]):
        ids = [i for i in range(1, n) if element_colour[i] == c and i in scores]
        if len(ids) < 2:
            continue
        for group in ward_groups(np.array([scores[i] for i in ids]), len(ids), tolerance, 1):
            parent[[ids[j] for j in group]] = ids[group[0]]
    return _relabel_consecutive(parent[labels].astype(np.int32))


class ColourMotionSegmenter:
    """Colour regions on key frames, propagated by flow with colour re-labelling (module doc).

    ``key_interval``/``new_overlap``: the paper's loop. ``median`` (px, odd, 0 = off): a median
    filter before the colours are read (compression noise and chroma bleeding at edges).
    ``min_colour_share``/``merge_distance``: the palette. ``min_area`` (px) and ``line_width``
    (px): regions that are fragments, not elements. ``min_support``: share of a region its warped element must cover to claim it.
    ``min_element_share``: elements smaller than this share of the frame join a neighbour.
    ``colour_motion_tolerance`` (px/frame, null = off): same-colour elements whose scores agree
    within it become one element.
    """

    role = "segmenter"

    def __init__(self, key_interval: int = 4, new_overlap: float = 0.5, min_colour_share: float = 0.005,
                 merge_distance: float = 64.0, min_area: int = 6, line_width: float = 1.0,
                 min_support: float = 0.2, min_element_share: float = 0.005,
                 colour_motion_tolerance: float | None = 1.0, median: int = 3) -> None:
        self.key_interval, self.new_overlap = int(key_interval), float(new_overlap)
        self.min_colour_share, self.merge_distance = float(min_colour_share), float(merge_distance)
        self.min_area, self.line_width, self.min_support = int(min_area), float(line_width), float(min_support)
        self.min_element_share = float(min_element_share)
        self.median = int(median)
        self.colour_motion_tolerance = None if colour_motion_tolerance is None else float(colour_motion_tolerance)

    def __call__(self, frames: np.ndarray, flow: Flow) -> np.ndarray:
        frames = check_frames(frames)
        f, h, w = frames.shape[:3]
        keys = list(range(0, f, self.key_interval))
        source = frames
        if self.median:
            source = np.stack([cv2.medianBlur(fr, self.median) for fr in frames])
        palette = build_palette(source[keys], self.min_colour_share, self.merge_distance)
        colour = quantise(source, palette)
        regions, region_colour = zip(*(colour_regions(c, self.min_area, self.line_width) for c in colour))
        element_colour: dict[int, int] = {}

        def masks(k: int) -> list[np.ndarray]:
            return [regions[k] == j for j in range(1, len(region_colour[k]))]

        def propagate(seed: np.ndarray, k: int) -> np.ndarray:
            for i in np.unique(seed[seed > 0]):
                element_colour[int(i)] = int(np.bincount(colour[k][seed == i]).argmax())
            out = np.zeros((f, h, w), np.int32)
            out[k] = seed
            for t in range(k + 1, f):
                out[t] = self._relabel(warp_backward(out[t - 1], flow.backward[t - 1]), regions[t],
                                       region_colour[t], element_colour)
            for t in range(k - 1, -1, -1):
                out[t] = self._relabel(warp_backward(out[t + 1], flow.forward[t]), regions[t],
                                       region_colour[t], element_colour)
            return out

        labels = key_frame_loop(f, (h, w), masks, propagate, self.key_interval, self.new_overlap)
        for t in range(f):
            labels[t] = fill_fragments(labels[t], regions[t] == 0)
        labels = absorb_small(labels, self.min_element_share * h * w)
        if self.colour_motion_tolerance is not None and f > 1:
            labels = merge_same_colour(labels, colour, flow.magnitude, self.colour_motion_tolerance)
        return labels

    def _relabel(self, warped: np.ndarray, regions: np.ndarray, region_colour: np.ndarray,
                 element_colour: dict[int, int]) -> np.ndarray:
        """Each colour region takes the element its warped pixels of the same colour mostly hold."""
        n_regions = len(region_colour)
        n_labels = int(warped.max()) + 1
        if n_labels <= 1 or n_regions <= 1:
            return np.zeros_like(warped)
        lut = np.full(n_labels, -2, np.int32)
        for i, c in element_colour.items():
            if i < n_labels:
                lut[i] = c
        same = (warped > 0) & (lut[warped] == region_colour[regions]) & (regions > 0)
        table = np.bincount(regions[same] * n_labels + warped[same], minlength=n_regions * n_labels)
        table = table.reshape(n_regions, n_labels)
        area = np.bincount(regions.ravel(), minlength=n_regions)
        best = table.argmax(1)
        ok = table[np.arange(n_regions), best] >= np.maximum(1, self.min_support * area)
        assign = np.where(ok, best, 0).astype(np.int32)
        assign[0] = 0
        return assign[regions]
