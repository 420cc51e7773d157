"""The curated clip on disk (format version 1, documented in docs/curation.md) and its reader.

One directory per clip::

    <clip id>/
      manifest.json        format, version, size, fps, prompt, layers and their motion scores, steps
      frames.mp4           the clip's frames (or frames/ as PNGs with clip.frames_format=png)
      masklets.json        per layer and frame a COCO RLE mask (pycocotools); the elements too
      tracks.npz           tracks [F, T, 3] (x, y, visibility), track_layer [T]; pool, pool_layer
      sketch_layer<i>.mp4  per layer its sketch, dark lines on white (LayerAnimate's convention)
      preview.png          each layer's mask over the frames with its score and tracks

:func:`read_clip` is what data loaders import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from layerkit.errors import LayerkitError

FORMAT = "layerkit-curated-clip"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """bool [F, H, W] -> one COCO RLE per frame (``counts`` as an ASCII string, JSON-ready)."""
    from pycocotools import mask as coco

    rles = coco.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def decode_masks(rles: list[dict[str, Any]]) -> np.ndarray:
    """One COCO RLE per frame -> bool [F, H, W]."""
    from pycocotools import mask as coco

    if not rles:
        return np.zeros((0, 0, 0), bool)
    data = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return coco.decode(data).transpose(2, 0, 1).astype(bool)


def write_clip(directory: Path, *, frames: np.ndarray, fps: float, layer_masks: np.ndarray, layer_scores: np.ndarray,
               layer_elements: list[list[int]], element_labels: np.ndarray | None,
               element_scores: dict[int, float], tracks: Any, sketches: np.ndarray, manifest: dict[str, Any],
               frames_format: str = "mp4") -> list[str]:
    """Write one clip into ``directory`` (which the caller stages): frames uint8 [F, H, W, 3],
    layer_masks bool [N, F, H, W], layer_scores [N], sketches float [N, F, H, W] (1 = line),
    tracks a :class:`~layerkit_plugins.curation.track.LayerTracks`. Returns the files written."""
    from layerkit.io.video import write_video

    f, h, w = frames.shape[:3]
    files = {"frames": "frames.mp4" if frames_format == "mp4" else "frames", "masklets": "masklets.json",
             "tracks": "tracks.npz"}
    if frames_format not in ("mp4", "png"):
        raise LayerkitError(f"clip.frames_format must be 'mp4' or 'png', got '{frames_format}'.")
    write_video(directory / files["frames"], frames, fps)
    masklets: dict[str, Any] = {"size": [h, w], "num_frames": f,
                                "layers": [encode_masks(m) for m in layer_masks]}
    if element_labels is not None:
        masklets["elements"] = [{"id": int(i), "score": float(element_scores[i]),
                                 "rle": encode_masks(element_labels == i)} for i in sorted(element_scores)]
    (directory / files["masklets"]).write_text(json.dumps(masklets))
    np.savez_compressed(directory / files["tracks"], tracks=tracks.tracks.astype(np.float32),
                        track_layer=tracks.layer.astype(np.int64), pool=tracks.pool.astype(np.float16),
                        pool_layer=tracks.pool_layer.astype(np.int64), width=np.int64(w), height=np.int64(h))
    layers = []
    for i, (mask, score, members) in enumerate(zip(layer_masks, layer_scores, layer_elements)):
        name = f"sketch_layer{i}.mp4"
        paper = 1.0 - sketches[i]
        write_video(directory / name, np.repeat(paper[..., None], 3, -1), fps)
        layers.append({"index": i, "motion_score": float(score), "background": 0 in members,
                       "elements": [int(e) for e in members], "area": float(mask.mean()), "sketch": name,
                       "tracks": int((tracks.layer == i).sum())})
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "num_frames": f, "height": h,
              "width": w, "fps": float(fps), "num_layers": len(layers), "layers": layers,
              "motion_scores": [float(s) for s in layer_scores], "files": files}
    (directory / MANIFEST).write_text(json.dumps(record, indent=2))
    return sorted(p.name for p in directory.iterdir())


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a curated clip directory, checked for format and version."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise LayerkitError(f"'{path}' is not a curated clip: it has no {MANIFEST}.")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LayerkitError(f"the manifest of curated clip '{path}' could not be read ({exc}).") from None
    if manifest.get("format") != FORMAT:
        raise LayerkitError(f"'{file}' is not a layerkit curated-clip manifest (format {manifest.get('format')!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LayerkitError(f"curated clip '{path}' has format version {manifest.get('format_version')}; "
                            f"this layerkit reads version {FORMAT_VERSION}.")
    return manifest


def read_clip(path: str | os.PathLike) -> dict[str, Any]:
    """Read a curated clip directory into tensors (N layers, F frames, T tracks):

    - ``frames`` float32 [F, 3, H, W] in [0, 1]; ``fps`` float; ``prompt`` str or None;
    - ``layer_masks`` float32 [N, F, 1, H, W] in {0, 1}, a partition of every frame, layer 0 the
      background; ``motion_scores`` float32 [N] (px/frame at this resolution);
    - ``tracks`` float32 [F, T, 3] (x, y in pixels, visibility in {0, 1}) and ``track_layer``
      int64 [T]; ``track_pool`` float32 [F, M, 3] and ``track_pool_layer`` int64 [M] (all kept tracks);
    - ``sketches`` float32 [N, F, 1, H, W] in [0, 1], 1 = line (0 outside the layer's masklet
      grown by one pixel);
    - ``id``, ``num_layers``, ``frame_motion_scores`` and the whole ``manifest``.
    """
    import torch

    from layerkit.io.video import read_video, unit_float

    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    try:
        video = read_video(path / files["frames"])
        masklets = json.loads((path / files["masklets"]).read_text())
        with np.load(path / files["tracks"]) as npz:
            tracks = {k: npz[k] for k in npz.files}
        sketches = [read_video(path / layer["sketch"]).frames for layer in manifest["layers"]]
    except (OSError, ValueError, KeyError) as exc:
        raise LayerkitError(f"curated clip '{path}' is incomplete or damaged ({type(exc).__name__}: {exc}).") from None
    f, h, w = manifest["num_frames"], manifest["height"], manifest["width"]
    frames = torch.from_numpy(unit_float(video.frames[:f, :h, :w, :3])).permute(0, 3, 1, 2)
    masks = np.stack([decode_masks(rles) for rles in masklets["layers"]]).astype(np.float32)
    lines = np.stack([1.0 - unit_float(s[:f, :h, :w]).mean(-1) for s in sketches])
    return {
        "id": manifest["id"],
        "frames": frames,
        "fps": float(manifest["fps"]),
        "prompt": manifest.get("prompt"),
        "num_layers": int(manifest["num_layers"]),
        "layer_masks": torch.from_numpy(masks)[:, :, None],
        "motion_scores": torch.tensor(manifest["motion_scores"], dtype=torch.float32),
        "frame_motion_scores": torch.tensor(manifest.get("frame_motion_scores", []), dtype=torch.float32),
        "tracks": torch.from_numpy(tracks["tracks"].astype(np.float32)),
        "track_layer": torch.from_numpy(tracks["track_layer"].astype(np.int64)),
        "track_pool": torch.from_numpy(tracks["pool"].astype(np.float32)),
        "track_pool_layer": torch.from_numpy(tracks["pool_layer"].astype(np.int64)),
        "sketches": torch.from_numpy(np.clip(lines, 0.0, 1.0).astype(np.float32))[:, :, None],
        "manifest": manifest,
    }
