"""Layers as sub-clips concatenated in time (LayerFlow sec. 3.1-3.2).

RGBA layout: [foreground, alpha, background, blended]; RGB layout: [foreground, background,
blended]. The foreground is composited over mid-grey (fg * alpha in [-1, 1]), the alpha matte
is repeated to three channels and scaled to [-1, 1]. Layer-wise prompts carry an index prefix
("0, " foreground, "1, " background, "2, " blended). Conditional variants keep one part given:
decomposition (blended), fg2bg (foreground and alpha), bg2fg (background). ``train_modes``
trains one model for all of them: each training sample draws its mode, so its given parts are
kept clean and out of the loss (LayerFlow's conditional variants, sec. 3.2).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.errors import LayerkitError, expect_shape
from layerkit.layers import check_frame_counts
from layerkit.protocols import Packed, Segment, Task

LAYOUTS = {"rgba": ("foreground", "alpha", "background", "blended"), "rgb": ("foreground", "background", "blended")}
GIVEN = {"generate": (), "decompose": ("blended",), "fg2bg": ("foreground", "alpha"), "bg2fg": ("background",)}
PROMPT_KEYS = ("foreground_prompt", "background_prompt", "prompt")


class LayeredTask(Task):
    sample_keys = ("foreground_rgb", "foreground_alpha", "background", "blended", *PROMPT_KEYS)

    def __init__(self, mode: str = "generate", layout: str = "rgba", index_prefix: bool = True,
                 scale_from: dict[str, str] | None = None, default_seed: int = 0, num_samples: int = 1,
                 train_modes: dict[str, float] | None = None) -> None:
        if mode not in GIVEN:
            raise LayerkitError(f"unknown layered mode '{mode}'; modes are {sorted(GIVEN)}.")
        if layout not in LAYOUTS:
            raise LayerkitError(f"unknown layout '{layout}'; layouts are {sorted(LAYOUTS)}.")
        self.mode, self.layout, self.index_prefix = mode, layout, index_prefix
        self.name = f"layered.{mode}"
        self.scale_from = dict(scale_from or {})  # adapter name -> boolean sample key (e.g. is_static)
        self.default_seed, self.num_samples = default_seed, num_samples
        self.given_names = [n for n in GIVEN[mode] if n in LAYOUTS[layout]]
        weights = {str(k): float(v) for k, v in (train_modes or {}).items()}
        if set(weights) - set(GIVEN) or any(v < 0 for v in weights.values()):
            raise LayerkitError(f"train_modes must map modes {sorted(GIVEN)} to weights >= 0; got {weights}.")
        self.train_modes = {k: v for k, v in weights.items() if v > 0}

    # -- packing ----------------------------------------------------------------------------
    def layer_videos(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Batch tensors in [0, 1] -> sub-clips [B, F, 3, H, W] in [-1, 1] (None when absent)."""
        fg, alpha = batch.get("foreground_rgb"), batch.get("foreground_alpha")
        out: dict[str, torch.Tensor | None] = {}
        if fg is not None and alpha is not None:
            expect_shape("foreground_alpha", alpha, "[B, F, 1, H, W]", alpha.dim() == 5 and alpha.shape[2] == 1)
            out["foreground"] = (fg * 2 - 1) * alpha  # over mid-grey
            out["alpha"] = alpha.expand(-1, -1, 3, -1, -1) * 2 - 1
        else:
            out["foreground"] = out["alpha"] = None
        for key in ("background", "blended"):
            video = batch.get(key)
            out[key] = video * 2 - 1 if video is not None else None
        for name, video in out.items():
            if video is not None:
                expect_shape(name, video, "[B, F, 3, H, W]", video.dim() == 5 and video.shape[2] == 3)
        check_frame_counts({k: v for k, v in out.items() if v is not None}, frame_dim=1)
        return out

    def pack(self, batch: dict[str, Any], *, training: bool) -> Packed:
        videos = self.layer_videos(batch)
        present = [v for v in videos.values() if v is not None]
        if not present:
            raise LayerkitError(f"task '{self.name}' got a batch with no layer video.")
        b, f, _, h, w = present[0].shape
        names = LAYOUTS[self.layout]
        if training:
            missing = [n for n in names if videos[n] is None]
            if missing:
                raise LayerkitError(f"task '{self.name}' needs training videos for {missing}.")
        else:
            missing = [n for n in self.given_names if videos[n] is None]
            if missing:
                raise LayerkitError(f"task '{self.name}' needs the given layer(s) {missing} as input.")
        segments = [Segment(n, f, videos[n] if (training or n in self.given_names) else None) for n in names]
        given = torch.tensor([[n in self.given_names for n in names]] * b, dtype=torch.bool)
        if training and self.train_modes:
            modes = random.choices(list(self.train_modes), weights=list(self.train_modes.values()), k=b)
            given = torch.tensor([[n in GIVEN[m] for n in names] for m in modes], dtype=torch.bool)
        prompts = [self.prompt_blocks(batch, i) for i in range(b)]
        scales = {adapter: torch.as_tensor(batch[key], dtype=torch.float32).reshape(b)
                  for adapter, key in self.scale_from.items() if key in batch}
        return Packed(segments, given, prompts, h, w, scales=scales)

    def prompt_blocks(self, batch: dict[str, Any], i: int) -> list[str]:
        texts = []
        for index, key in enumerate(PROMPT_KEYS):
            value = batch.get(key)
            if value is None:
                raise LayerkitError(f"task '{self.name}' needs '{key}' in every sample.")
            text = value[i] if isinstance(value, list | tuple) else str(value)
            texts.append(f"{index}, {text}" if self.index_prefix else text)
        return texts

    # -- sampling inputs ----------------------------------------------------------------------
    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
        """One sample per output: prompts and given videos from the user; what the user leaves
        out comes from held-out shapes-world samples (whose ground truth the evaluator uses)."""
        from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

        n = int(inputs.get("num_samples", self.num_samples))
        seed = int(inputs.get("seed", self.default_seed))
        config = ShapesConfig(num_frames=num_frames, height=height, width=width)
        samples = [make_sample(seed_for("test", seed, i), config) for i in range(n)]
        user_files = {k: inputs.get(k) for k in ("foreground", "alpha", "background", "blended") if inputs.get(k)}
        videos = self._read_inputs(user_files, height, width, num_frames) if user_files else {}
        out = []
        for sample in samples:
            if not user_files:
                sample["ground_truth"] = dict(sample)
            sample.update(videos)
            sample.update({key: inputs[key] for key in PROMPT_KEYS if inputs.get(key)})
            out.append(sample)
        return out

    def _read_inputs(self, files: dict[str, str], height: int, width: int, num_frames: int) -> dict[str, Any]:
        from layerkit.io.video import read_video

        out: dict[str, torch.Tensor] = {}
        for key, path in files.items():
            if not Path(path).exists():
                raise LayerkitError(f"input '{key}' file '{path}' does not exist.")
            video = read_video(path, max_frames=num_frames)
            if video.num_frames < num_frames:
                raise LayerkitError(f"input '{key}' video '{path}' has {video.num_frames} frames; this run needs {num_frames}.")
            frames = torch.from_numpy(video.frames).float().div(255).permute(0, 3, 1, 2)  # [F, C, H, W]
            frames = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            if key == "foreground":
                if frames.shape[1] == 4:
                    out["foreground_alpha"] = frames[:, 3:].clamp(0, 1)
                out["foreground_rgb"] = frames[:, :3].clamp(0, 1)
            elif key == "alpha":
                out["foreground_alpha"] = frames[:, :1].clamp(0, 1)
            else:
                out[key] = frames[:, :3].clamp(0, 1)
        if "foreground_rgb" in out and "foreground_alpha" not in out:
            raise LayerkitError("the foreground input has no alpha channel; give an RGBA video or an 'alpha' video.")
        return out

    # -- outputs ------------------------------------------------------------------------------
    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for i in range(next(iter(decoded.values())).shape[0]):
            layers: dict[str, torch.Tensor] = {}
            fg = (decoded["foreground"][i].float().clamp(-1, 1) + 1) / 2  # fg over grey, [F, 3, H, W]
            if "alpha" in decoded:
                alpha = ((decoded["alpha"][i].float().mean(1, keepdim=True) + 1) / 2).clamp(0, 1)
                rgb = ((fg - 0.5 * (1 - alpha)) / alpha.clamp_min(1e-3)).clamp(0, 1)
                rgb = torch.where(alpha > 0.02, rgb, torch.full_like(rgb, 0.5))
                layers["foreground"] = torch.cat([rgb, alpha], dim=1)
                layers["alpha"] = alpha
            else:
                layers["foreground"] = fg
            layers["background"] = ((decoded["background"][i].float() + 1) / 2).clamp(0, 1)
            layers["blended"] = ((decoded["blended"][i].float() + 1) / 2).clamp(0, 1)
            outputs.append(layers)
        return outputs

    def evaluate(self, outputs: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> dict[str, float] | None:
        """Shapes-world metrics when the inputs came from the shapes world."""
        truth = batch.get("ground_truth")
        if not truth or "alpha" not in outputs[0]:
            return None
        from layerkit.data.evaluate import evaluate_layered, summarise

        rows = []
        for out, sample in zip(outputs, truth, strict=True):
            pred = {"foreground_rgb": out["foreground"][:, :3], "foreground_alpha": out["alpha"],
                    "background": out["background"], "blended": out["blended"]}
            rows.append(evaluate_layered(pred, sample))
        return summarise(rows)


def generate_task(**kwargs: Any) -> LayeredTask:
    return LayeredTask(mode="generate", **kwargs)


def decompose_task(**kwargs: Any) -> LayeredTask:
    return LayeredTask(mode="decompose", **kwargs)


def fg2bg_task(**kwargs: Any) -> LayeredTask:
    return LayeredTask(mode="fg2bg", **kwargs)


def bg2fg_task(**kwargs: Any) -> LayeredTask:
    return LayeredTask(mode="bg2fg", **kwargs)
