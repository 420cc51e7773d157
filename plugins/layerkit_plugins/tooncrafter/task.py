"""Keyframe tasks of the ``tooncrafter`` backbone alone: ``tooncrafter.i2v`` (the first frame given)
and ``tooncrafter.interpolate`` (the first and the last frame given), so ToonCrafter runs in
layerkit before any layer control exists. LayerAnimate's tasks extend these with layers.

A sample: ``video`` [F, 3, H, W] in [0, 1] (training clip; at sampling only its keyframes matter),
``prompt``, ``fps``. The packed batch is one segment ``video`` with ``Packed.given`` [B, F] marking
the keyframes; the backbone turns them into its concatenated image latent and image tokens.

Sampling inputs: ``inputs.first_frame`` (an image file), ``inputs.last_frame`` (interpolation),
``inputs.prompt``, ``inputs.fps``; with no input, held-out shapes-world clips give the keyframes,
the prompt and the ground truth (``frame_error``: mean absolute error against the true frames).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit.protocols import Packed, Segment, Task
from layerkit_plugins.tooncrafter import FILE_KEYS, INPUT_KEYS

MODES = ("i2v", "interpolate")


def keyframes(mode: str, num_frames: int) -> list[int]:
    if mode not in MODES:
        raise LayerkitError(f"unknown mode '{mode}'; modes are {', '.join(MODES)}.")
    if mode == "interpolate" and num_frames < 2:
        raise LayerkitError(f"interpolation needs at least 2 frames; got {num_frames}.")
    return [0] if mode == "i2v" else [0, num_frames - 1]


def read_frame(path: str | Path, height: int, width: int, name: str) -> torch.Tensor:
    """An image file -> [3, H, W] in [0, 1], resized (shorter side) and centre-cropped as LayerAnimate's
    demos are (``Resize(min(H, W))`` + ``CenterCrop``)."""
    from layerkit.io.video import fit_frames, read_image, unit_float

    rgb = unit_float(read_image(path, name=f"inputs.{name}")[..., :3])  # 8 or 16 bits, alpha dropped
    frame = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    return fit_frames(frame, height, width, "crop", name=f"inputs.{name}")[0][0]


class KeyframeTask(Task):
    input_keys = INPUT_KEYS
    file_keys = FILE_KEYS

    def __init__(self, mode: str = "i2v", fps: float | None = None, default_seed: int = 0, num_samples: int = 1) -> None:
        keyframes(mode, 2)
        self.mode, self.fps = mode, fps
        self.name = f"tooncrafter.{mode}"
        self.default_seed, self.num_samples = default_seed, num_samples

    def pack(self, batch: dict[str, Any], *, training: bool) -> Packed:
        video = batch.get("video", batch.get("blended"))  # the shapes world's clips are its blended videos
        if video is None or video.dim() != 5 or video.shape[2] != 3:
            shape = None if video is None else tuple(video.shape)
            raise LayerkitError(f"task '{self.name}' needs 'video' [B, F, 3, H, W] in [0, 1]; got {shape}.")
        b, f, _, h, w = video.shape
        modes = batch.get("mode", self.mode)  # a sample may name its own mode (a batch may mix them)
        modes = [modes] * b if isinstance(modes, str) else list(modes)
        given = torch.zeros(b, f, dtype=torch.bool)
        for i, mode in enumerate(modes):
            given[i, keyframes(mode, f)] = True
        clip = video.float() * 2 - 1
        if not training:  # only the keyframes are known
            clip = torch.where(given[:, :, None, None, None], clip, torch.zeros_like(clip))
        prompts = [[p] for p in _strings(batch.get("prompt"), b, "prompt")]
        fps = batch.get("fps", self.fps)
        conditions = {} if fps is None else {"fps": torch.as_tensor(fps, dtype=torch.float32).reshape(-1).expand(b)}
        return Packed([Segment("video", f, clip)], given, prompts, h, w, conditions=conditions)

    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
        n = int(inputs.get("num_samples", self.num_samples))
        if n < 1:
            raise LayerkitError(f"inputs.num_samples must be at least 1; got {n}.")
        fps = inputs.get("fps", self.fps)
        if inputs.get("first_frame") or inputs.get("last_frame") or inputs.get("prompt"):
            return [self._user_sample(inputs, height, width, num_frames, fps) for _ in range(n)]
        from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

        seed = int(inputs.get("seed", self.default_seed))
        config = ShapesConfig(num_frames=num_frames, height=height, width=width)
        out = []
        for i in range(n):
            truth = make_sample(seed_for("test", seed, i), config)
            sample = {"video": truth["blended"], "prompt": truth["prompt"], "ground_truth": truth["blended"]}
            if fps is not None:
                sample["fps"] = float(fps)
            out.append(sample)
        return out

    def _user_sample(self, inputs: dict[str, Any], height: int, width: int, num_frames: int,
                     fps: float | None) -> dict[str, Any]:
        if not inputs.get("first_frame"):
            raise LayerkitError(f"task '{self.name}' animates a first frame: give inputs.first_frame=IMAGE.")
        if self.mode == "interpolate" and not inputs.get("last_frame"):
            raise LayerkitError("tooncrafter.interpolate needs inputs.last_frame=IMAGE as well as inputs.first_frame.")
        if self.mode == "i2v" and inputs.get("last_frame"):
            raise LayerkitError("inputs.last_frame is the input of interpolation; run with task=tooncrafter_interpolate.")
        video = torch.zeros(num_frames, 3, height, width)
        video[0] = read_frame(inputs["first_frame"], height, width, "first_frame")
        if self.mode == "interpolate":
            video[-1] = read_frame(inputs["last_frame"], height, width, "last_frame")
        sample: dict[str, Any] = {"video": video, "prompt": str(inputs.get("prompt") or "")}
        if not inputs.get("prompt"):
            sample["notes"] = ["inputs.prompt not given: empty prompt"]
        if fps is not None:
            sample["fps"] = float(fps)
        return sample

    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        video = ((decoded["video"].float() + 1) / 2).clamp(0, 1)
        return [{"video": clip} for clip in video]

    def evaluate_samples(self, outputs: list[dict[str, torch.Tensor]],
                         batch: dict[str, Any]) -> list[dict[str, float]] | None:
        truth = batch.get("ground_truth")
        if truth is None:
            return None
        return [{"frame_error": (out["video"] - t.to(out["video"].dtype)).abs().mean().item()}
                for out, t in zip(outputs, truth, strict=True)]


def _strings(value: Any, b: int, name: str) -> list[str]:
    if value is None:
        raise LayerkitError(f"every sample needs a '{name}'.")
    values = [value] * b if isinstance(value, str) else list(value)
    if len(values) != b:
        raise LayerkitError(f"got {len(values)} values of '{name}' for {b} samples.")
    return [str(v) for v in values]


def i2v_task(**kwargs: Any) -> KeyframeTask:
    return KeyframeTask(mode="i2v", **kwargs)


def interpolate_task(**kwargs: Any) -> KeyframeTask:
    return KeyframeTask(mode="interpolate", **kwargs)
