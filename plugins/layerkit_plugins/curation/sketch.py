"""Sketch extraction: a classical line extractor (default) and the learned line-drawing generator.

A sketch step maps frames ``uint8 [F, H, W, 3]`` to line strength ``float32 [F, H, W]`` in [0, 1]
(1 = line). The pipeline cuts it to each layer's masklet; files store it the way LayerAnimate's
demos do (dark lines on white).

- ``canny`` (default, CPU): Canny edges of every colour channel, united (a line between two
  colours of equal brightness still shows); lines are 1 px (``width`` thickens them);
- ``lineart``: the informative-drawings generator (Chan et al. 2022, the line-drawing method of
  seed 001) with its released weights (``sk_model.pth`` as distributed in lllyasviel/Annotators,
  MIT), from a local path.
"""

from __future__ import annotations

import cv2
import numpy as np

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.steps import check_frames, load_state_dict, resolve_device


class CannySketch:
    """Thin lines where any colour channel has a Canny edge (hysteresis thresholds ``low``/``high``
    on the Sobel gradient, 0..255 units), optionally thickened to ``width`` px."""

    role = "sketch"

    def __init__(self, low: float = 100.0, high: float = 200.0, width: int = 1) -> None:
        if not (0 <= low < high) or width < 1:
            raise LayerkitError(f"sketch needs 0 <= low < high and width >= 1, got {low}, {high}, {width}.")
        self.low, self.high, self.width = float(low), float(high), int(width)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames)
        out = np.empty(frames.shape[:3], np.float32)
        grow = np.ones((self.width, self.width), np.uint8)
        for t, frame in enumerate(frames):
            edges = np.zeros(frame.shape[:2], np.uint8)
            for c in range(3):
                edges |= cv2.Canny(np.ascontiguousarray(frame[..., c]), self.low, self.high, L2gradient=True)
            if self.width > 1:
                edges = cv2.dilate(edges, grow)
            out[t] = edges > 0
        return out


def line_drawing_generator(residual_blocks: int = 3):
    """The informative-drawings ResNet generator (3 -> 1 channels, sigmoid), named as its weights are."""
    from torch import nn

    def conv_norm_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
        return [conv, nn.InstanceNorm2d(channels), nn.ReLU(inplace=True)]

    class Residual(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv_block = nn.Sequential(
                nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
                nn.ReLU(inplace=True), nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3),
                nn.InstanceNorm2d(channels))

        def forward(self, x):
            return x + self.conv_block(x)

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model0 = nn.Sequential(nn.ReflectionPad2d(3), *conv_norm_relu(nn.Conv2d(3, 64, 7), 64))
            self.model1 = nn.Sequential(*conv_norm_relu(nn.Conv2d(64, 128, 3, stride=2, padding=1), 128),
                                        *conv_norm_relu(nn.Conv2d(128, 256, 3, stride=2, padding=1), 256))
            self.model2 = nn.Sequential(*[Residual(256) for _ in range(residual_blocks)])
            up = {"stride": 2, "padding": 1, "output_padding": 1}
            self.model3 = nn.Sequential(*conv_norm_relu(nn.ConvTranspose2d(256, 128, 3, **up), 128),
                                        *conv_norm_relu(nn.ConvTranspose2d(128, 64, 3, **up), 64))
            self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

        def forward(self, x):
            for block in (self.model0, self.model1, self.model2, self.model3, self.model4):
                x = block(x)
            return x

    return Generator()


class LineArtSketch:
    """The learned line-drawing generator from a local weights file (``path``); frames are processed
    at their size padded to a multiple of 4, ``batch_size`` at a time."""

    role = "sketch"

    def __init__(self, path: str | None = None, batch_size: int = 8, device: str = "auto") -> None:
        state = load_state_dict(path, "line-art sketch", "sketch.path")
        blocks = len({k.split(".")[1] for k in state if k.startswith("model2.")})
        model = line_drawing_generator(max(blocks, 1))
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise LayerkitError(f"'{path}' holds no informative-drawings line-art generator weights "
                                "(its tensors do not match Generator(3, 1)); give sk_model.pth.")
        model.load_state_dict(state)
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.batch_size = max(1, int(batch_size))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        frames = check_frames(frames)
        f, h, w = frames.shape[:3]
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="replicate")
        out = []
        with torch.inference_mode():
            for i in range(0, f, self.batch_size):
                out.append(self.model(x[i : i + self.batch_size].to(self.device)).float().cpu())
        drawing = torch.cat(out)[:, 0, :h, :w].numpy()  # white paper, dark lines
        return np.clip(1.0 - drawing, 0.0, 1.0).astype(np.float32)
