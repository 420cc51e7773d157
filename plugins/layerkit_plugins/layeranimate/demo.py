"""Read a folder laid out like the authors' demos (IamCreateAI/LayerAnimate ``__assets__/demos/demo_N``
with ``scripts/demoN.yaml``; preprocessing of ``scripts/animate_Layer.py``) into one sample
(``schema.py``).

Files in the folder (the authors only use ``.jpg``; ``.jpeg`` and ``.png`` are accepted too):

- ``first_frame.jpg`` (required); ``last_frame.jpg`` (required for ``mode: interpolate``);
- ``layer_{i}.jpg``: the mask of layer i on the first frame (grayscale, ``> 0.5`` after the
  resize/crop, a missing file is an empty mask), ``layer_{i}_last.jpg`` on the last frame
  (interpolation only), i < ``layer_capacity``; each mask must have its keyframe's size;
- ``sketch.mp4`` (optional): exactly L frames, given to layer ``sketch_layer_index``; others white;
- ``trajectory.npz`` (optional): keys ``trajectory`` [L, P, 2] (x, y pixels), ``width``, ``height``
  (or the curation format ``tracks`` [L, P, 3]); all its tracks go to layer ``traj_layer_index``.

Settings: the authors keep them in ``scripts/demoN.yaml`` beside the code, with ``demo_dir``
pointing to the folder (relative to the repository root). :func:`read_demo` takes either such a
yaml file, or a folder holding its settings in ``demo.yaml`` (looked for first) or
``config.yaml``, or a folder plus a settings mapping/yaml path. Fields:

- required: ``layer_capacity`` (int >= 1), ``motion_scores``, ``layer_static``, ``layer_validity``
  (lists of length ``layer_capacity``; scores in [0, 1] or -1), ``prompt``, and
  ``sketch_layer_index`` / ``traj_layer_index`` when ``sketch.mp4`` / ``trajectory.npz`` exist;
- optional (default): ``mode`` (``interpolate``, as the authors), ``n_prompt`` (""), ``fps`` (24),
  ``num_inference_steps`` (50), ``guidance_scale`` (7.5), ``guidance_rescale`` (0.7), ``eta`` (1.0),
  ``seed`` (None), ``num_videos_per_prompt`` (1), ``W`` / ``H`` / ``L`` (512 / 320 / 16; the file's
  values win over the keyword arguments, as the authors' ``config.get("W", args.W)``);
- read and ignored: ``pretrained_model_path``, ``demo_dir``, ``mixed_precision``,
  ``enable_xformers_memory_efficient_attention``. Any other field is an error.

Preprocessing as the authors: images ``Resize(min(H, W))`` (bilinear, PIL) + ``CenterCrop(H, W)``
(which pads with black when the resized image is narrower than the crop), masks the same on the
grayscale image then ``> 0.5``, the sketch frames like the images, the tracks scaled by
``min(H, W) / shorter side of (width, height)`` and shifted by the crop.

``video`` (there is no clip in a demo) is a placeholder: the first frame on all F frames (i2v), or
the first frame on frames 0..F//2-1 and the last on F//2..F-1 (interpolation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from layerkit.errors import LayerkitError
from layerkit.io.video import read_image, read_video, unit_float
from layerkit_plugins.layeranimate.layers import MODES, check_motion_scores, keyframe_indices
from layerkit_plugins.layeranimate.schema import no_sketch, validate_sample
from layerkit_plugins.layeranimate.trajectory import fit_tracks, load_tracks, no_trajectory, trajectory_maps

__all__ = ["DEMO_DEFAULTS", "IGNORED_FIELDS", "SETTINGS_FILES", "find_image", "load_demo_settings",
           "read_demo", "transform_image", "transform_mask"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SETTINGS_FILES = ("demo.yaml", "config.yaml")
DEMO_DEFAULTS: dict[str, Any] = {
    "mode": "interpolate", "n_prompt": "", "fps": 24, "num_inference_steps": 50, "guidance_scale": 7.5,
    "guidance_rescale": 0.7, "eta": 1.0, "seed": None, "num_videos_per_prompt": 1, "W": 512, "H": 320, "L": 16,
}
REQUIRED_FIELDS = ("layer_capacity", "motion_scores", "layer_static", "layer_validity", "prompt")
INDEX_FIELDS = ("sketch_layer_index", "traj_layer_index")
IGNORED_FIELDS = ("pretrained_model_path", "demo_dir", "mixed_precision", "enable_xformers_memory_efficient_attention")
_KNOWN = set(DEMO_DEFAULTS) | set(REQUIRED_FIELDS) | set(INDEX_FIELDS) | set(IGNORED_FIELDS)


# ----------------------------------------------------------------------------- settings


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # omegaconf/yaml raise many kinds
        raise LayerkitError(f"could not read settings file '{path}': {str(exc).splitlines()[0]}.") from None
    if not isinstance(content, dict):
        raise LayerkitError(f"settings file '{path}' does not hold a mapping of fields.")
    return content


def _resolve_demo_dir(value: Any, yaml_path: Path, root: str | os.PathLike | None) -> Path:
    if not isinstance(value, str) or not value:
        raise LayerkitError(f"'{yaml_path}' field demo_dir is {value!r}; expected the path of the demo folder.")
    path = Path(value)
    if path.is_absolute():
        candidates = [path]
    elif root is not None:
        candidates = [Path(root) / path]
    else:  # the authors' yamls live in scripts/ and name the folder from the repository root
        candidates = [yaml_path.parent / path, yaml_path.parent.parent / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise LayerkitError(f"'{yaml_path}' field demo_dir '{value}' is not a folder (looked in "
                        f"{', '.join(str(c.parent) for c in candidates)}).")


def load_demo_settings(path: str | os.PathLike, settings: Mapping[str, Any] | str | os.PathLike | None = None,
                       root: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any], str]:
    """``(folder, fields, where)`` for :func:`read_demo`'s arguments; ``where`` names the settings'
    origin in messages."""
    path = Path(path)
    if isinstance(settings, Mapping):
        if not path.is_dir():
            raise LayerkitError(f"demo folder '{path}' does not exist.")
        return path, dict(settings), "the demo settings"
    if settings is not None:
        yaml_path = Path(settings)
        if not yaml_path.is_file():
            raise LayerkitError(f"settings file '{yaml_path}' does not exist.")
        if not path.is_dir():
            raise LayerkitError(f"demo folder '{path}' does not exist.")
        return path, _load_yaml(yaml_path), f"'{yaml_path}'"
    if path.is_file():
        fields = _load_yaml(path)
        if "demo_dir" not in fields:
            raise LayerkitError(f"'{path}' has no field demo_dir naming the demo folder.")
        return _resolve_demo_dir(fields["demo_dir"], path, root), fields, f"'{path}'"
    if not path.is_dir():
        raise LayerkitError(f"demo folder '{path}' does not exist.")
    for name in SETTINGS_FILES:
        if (path / name).is_file():
            return path, _load_yaml(path / name), f"'{path / name}'"
    raise LayerkitError(f"demo folder '{path}' has no settings file ({' or '.join(SETTINGS_FILES)}); "
                        f"pass the authors' demo yaml or the settings instead.")


def _int(fields: dict[str, Any], key: str, where: str, low: int) -> int:
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LayerkitError(f"{where} field {key} is {value!r}; expected an integer >= {low}.")
    return value


def _number(fields: dict[str, Any], key: str, where: str, low: float) -> float:
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise LayerkitError(f"{where} field {key} is {value!r}; expected a number >= {low}.")
    return float(value)


def _flags(fields: dict[str, Any], key: str, where: str, capacity: int) -> torch.Tensor:
    value = fields[key]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, bool) for v in value):
        raise LayerkitError(f"{where} field {key} is {value!r}; expected a list of {capacity} true/false values.")
    _check_length(value, key, where, capacity)
    return torch.tensor(value, dtype=torch.bool)


def _check_length(value: list, key: str, where: str, capacity: int) -> None:
    if len(value) > capacity:
        raise LayerkitError(f"{where} field {key} lists {len(value)} layers but the layer capacity is {capacity}.")
    if len(value) < capacity:
        raise LayerkitError(f"{where} field {key} lists {len(value)} layers; expected one per layer ({capacity}).")


def _check_fields(fields: dict[str, Any], where: str) -> dict[str, Any]:
    if "layer" in fields or "first_frame_path" in fields:
        raise LayerkitError(f"{where} is a config of the authors' DiT variant (first_frame_path, layer), which "
                            f"this reader does not support.")
    unknown = sorted(set(fields) - _KNOWN)
    if unknown:
        raise LayerkitError(f"{where} has unknown field {unknown[0]}; expected fields: {', '.join(sorted(_KNOWN))}.")
    missing = [k for k in REQUIRED_FIELDS if fields.get(k) is None]
    if missing:
        raise LayerkitError(f"{where} lacks the field {missing[0]}.")
    return {**DEMO_DEFAULTS, **{k: v for k, v in fields.items() if v is not None or k == "seed"}}


# ----------------------------------------------------------------------------- images


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` with the first of .jpg, .jpeg, .png that exists, else None."""
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _open(path: Path, mode: str) -> Image.Image | torch.Tensor:
    """An image file (``layerkit.io.video.read_image``) in ``mode`` (RGB or L)."""
    return _as_image(read_image(path), mode)


def _as_image(array: np.ndarray, mode: str) -> Image.Image | torch.Tensor:
    """An 8-bit ``[H, W, C]`` array as a PIL image in ``mode`` (the authors' transforms, exactly);
    a 16-bit one as a float ``[C, H, W]`` tensor in [0, 1] (its depth kept; L is ITU-R 601 luma,
    as PIL's)."""
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array)).convert(mode)
    rgb = torch.from_numpy(unit_float(array[..., :3])).permute(2, 0, 1)
    if mode == "L":
        return (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    return rgb


def _fit(image: Image.Image | torch.Tensor, height: int, width: int) -> Image.Image | torch.Tensor:
    image = TF.resize(image, min(height, width), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(image, [height, width])


def transform_image(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An RGB image -> ``[3, H, W]`` in [0, 1] after ``Resize(min(H, W)) + CenterCrop(H, W)``."""
    if isinstance(image, torch.Tensor):
        return _fit(image, height, width).clamp(0, 1)
    return TF.to_tensor(_fit(image.convert("RGB"), height, width))


def transform_mask(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A mask image -> ``[1, H, W]`` float {0, 1}: grayscale, resized/cropped like the frames, ``> 0.5``."""
    if isinstance(image, torch.Tensor):
        return (_fit(image, height, width) > 0.5).float()
    return (TF.to_tensor(_fit(image.convert("L"), height, width)) > 0.5).float()


# ----------------------------------------------------------------------------- reader


def read_demo(path: str | os.PathLike, settings: Mapping[str, Any] | str | os.PathLike | None = None, *,
              root: str | os.PathLike | None = None, height: int | None = None, width: int | None = None,
              num_frames: int | None = None) -> dict[str, Any]:
    """Read a demo into one sample (``schema.py`` keys plus ``negative_prompt`` and ``sampling``).

    ``path``: a demo folder (settings in ``settings`` or in its ``demo.yaml`` / ``config.yaml``),
    or one of the authors' demo yaml files (its ``demo_dir`` is looked up relative to ``root``, or
    else to the yaml's folder, its parent and the working directory). ``height``/``width``/
    ``num_frames`` are used where the settings have no ``H``/``W``/``L``.
    """
    folder, raw_fields, where = load_demo_settings(path, settings, root)
    fields = _check_fields(raw_fields, where)
    for key, value in (("H", height), ("W", width), ("L", num_frames)):
        if raw_fields.get(key) is None and value is not None:
            fields[key] = value
    mode = fields["mode"]
    if mode not in MODES:
        raise LayerkitError(f"{where} field mode is {mode!r}; expected one of {', '.join(MODES)}.")
    H, W = _int(fields, "H", where, 8), _int(fields, "W", where, 8)
    L = _int(fields, "L", where, 2 if mode == "interpolate" else 1)
    capacity = _int(fields, "layer_capacity", where, 1)
    if not isinstance(fields["prompt"], str) or not isinstance(fields["n_prompt"], str):
        raise LayerkitError(f"{where} fields prompt and n_prompt must be strings.")
    scores = fields["motion_scores"]
    if not isinstance(scores, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                    for v in scores):
        raise LayerkitError(f"{where} field motion_scores is {scores!r}; expected a list of {capacity} numbers.")
    _check_length(list(scores), "motion_scores", where, capacity)
    motion_scores = check_motion_scores(scores, "motion_scores")
    layer_static = _flags(fields, "layer_static", where, capacity)
    layer_validity = _flags(fields, "layer_validity", where, capacity)
    fps = _int(fields, "fps", where, 1)
    sampling = {
        "num_inference_steps": _int(fields, "num_inference_steps", where, 1),
        "guidance_scale": _number(fields, "guidance_scale", where, 0.0),
        "guidance_rescale": _number(fields, "guidance_rescale", where, 0.0),
        "eta": _number(fields, "eta", where, 0.0),
        "seed": None if fields["seed"] is None else _int(fields, "seed", where, 0),
        "num_videos_per_prompt": _int(fields, "num_videos_per_prompt", where, 1),
    }

    # keyframes and masks
    stems = ["first_frame"] + (["last_frame"] if mode == "interpolate" else [])
    images = []
    for stem in stems:
        file = find_image(folder, stem)
        if file is None:
            why = " (mode interpolate needs it)" if stem == "last_frame" else ""
            raise LayerkitError(f"demo folder '{folder}' has no {stem}.jpg{why}.")
        images.append(_open(file, "RGB"))
    keyframes = torch.stack([transform_image(im, H, W) for im in images])
    extra = sorted(p.name for p in folder.glob("layer_*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and _layer_number(p.stem) is not None and _layer_number(p.stem) >= capacity)
    if extra:
        count = max(_layer_number(Path(name).stem) for name in extra) + 1
        raise LayerkitError(f"demo folder '{folder}' has masks for {count} layers ({extra[-1]}) but the layer "
                            f"capacity is {capacity}.")
    layer_masks = torch.zeros(capacity, len(stems), 1, H, W)
    for i in range(capacity):
        for k, suffix in enumerate(["", "_last"][: len(stems)]):
            file = find_image(folder, f"layer_{i}{suffix}")
            if file is None:
                continue
            mask = _open(file, "L")
            if mask.size != images[k].size:
                raise LayerkitError(f"mask '{file.name}' is {mask.size[0]}x{mask.size[1]} but {stems[k]} is "
                                    f"{images[k].size[0]}x{images[k].size[1]}.")
            layer_masks[i, k] = transform_mask(mask, H, W)

    # sketch
    sketch = no_sketch(capacity, L, H, W)
    sketch_file = folder / "sketch.mp4"
    if sketch_file.is_file():
        index = _layer_index(fields, "sketch_layer_index", where, capacity, sketch_file.name)
        frames = read_video(sketch_file).frames
        if frames.shape[0] != L:
            raise LayerkitError(f"'{sketch_file}' has {frames.shape[0]} frames, expected L = {L}.")
        sketch[index] = torch.stack([transform_image(_as_image(f, "RGB"), H, W) for f in frames])

    # trajectory
    trajectory = no_trajectory(capacity, L, H, W)
    tracks, track_layer = torch.zeros(L, 0, 2), torch.zeros(0, dtype=torch.long)
    traj_file = folder / "trajectory.npz"
    if traj_file.is_file():
        index = _layer_index(fields, "traj_layer_index", where, capacity, traj_file.name)
        points, _, (src_h, src_w) = load_tracks(traj_file, num_frames=L)
        points = fit_tracks(points, src_h, src_w, H, W)
        tracks = torch.from_numpy(np.ascontiguousarray(points))
        track_layer = torch.full((points.shape[1],), index, dtype=torch.long)
        trajectory = trajectory_maps(points, track_layer, H, W, capacity)

    frames = keyframe_indices(mode, L)
    if mode == "i2v":
        video = keyframes[:1].expand(L, -1, -1, -1).clone()
    else:
        video = torch.cat([keyframes[:1].expand(L // 2, -1, -1, -1), keyframes[1:].expand(L - L // 2, -1, -1, -1)])
    sample = {
        "video": video, "prompt": fields["prompt"], "fps": fps, "mode": mode,
        "keyframe_indices": torch.tensor(frames, dtype=torch.long), "keyframes": keyframes,
        "layer_masks": layer_masks, "layer_validity": layer_validity, "layer_static": layer_static,
        "motion_scores": motion_scores, "trajectory": trajectory, "sketch": sketch,
        "tracks": tracks, "track_layer": track_layer,
        "negative_prompt": fields["n_prompt"], "sampling": sampling,
    }
    return validate_sample(sample)


def _layer_number(stem: str) -> int | None:
    body = stem[len("layer_"):]
    body = body[: -len("_last")] if body.endswith("_last") else body
    return int(body) if body.isdigit() else None


def _layer_index(fields: dict[str, Any], key: str, where: str, capacity: int, file: str) -> int:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < capacity:
        raise LayerkitError(f"{where} field {key} is {value!r}; {file} needs a layer index in 0..{capacity - 1}.")
    return value
