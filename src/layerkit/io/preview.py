"""Preview images for layers: RGBA over a checkerboard and a labelled PNG contact sheet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from layerkit.errors import LayerkitError
from layerkit.io.video import as_uint8_frames, atomic_output

LIGHT, DARK = 204, 153  # checkerboard greys
PAD = 4  # pixels between cells and around the sheet
LABEL_H = 14  # height of the label strip above each row
BACKGROUND = (32, 32, 32)


def checkerboard(h: int, w: int, cell: int = 8) -> np.ndarray:
    """Light/dark grey checkerboard, uint8 ``[H, W, 3]``; the top-left cell is light."""
    if h < 1 or w < 1 or cell < 1:
        raise LayerkitError(f"checkerboard needs positive h, w and cell, got h={h}, w={w}, cell={cell}.")
    yy, xx = np.indices((h, w))
    dark = ((yy // cell) + (xx // cell)) % 2 == 1
    return np.repeat(np.where(dark, DARK, LIGHT).astype(np.uint8)[..., None], 3, axis=-1)


def composite_over_checkerboard(frames_rgba, cell: int = 8) -> np.ndarray:
    """Alpha-composite RGBA frames ``[F, H, W, 4]`` (uint8 or float in [0, 1]) over a checkerboard -> uint8 ``[F, H, W, 3]``."""
    frames = as_uint8_frames(frames_rgba, "frames_rgba", channels=(4,))
    board = checkerboard(frames.shape[1], frames.shape[2], cell).astype(np.float32)
    alpha = frames[..., 3:].astype(np.float32) / 255.0
    out = frames[..., :3].astype(np.float32) * alpha + board * (1.0 - alpha)
    return (out + 0.5).astype(np.uint8)


def _to_rgb(frames, name: str) -> np.ndarray:
    """Any layer ``[F, H, W]`` or ``[F, H, W, 1|3|4]`` as displayable uint8 ``[F, H, W, 3]``."""
    array = as_uint8_frames(frames, f"layer '{name}'", channels=(1, 3, 4))
    if array.shape[-1] == 1:  # mask / alpha: grey
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return composite_over_checkerboard(array)
    return array


def _pick(num_frames: int, max_frames: int) -> np.ndarray:
    """Indices of up to ``max_frames`` evenly spaced frames, first and last included."""
    count = min(num_frames, max_frames)
    return np.unique(np.linspace(0, num_frames - 1, count).round().astype(int))


def write_preview_sheet(
    path: str | os.PathLike,
    layers: dict[str, np.ndarray],
    *,
    max_frames: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write a PNG grid: one labelled row per layer, up to ``max_frames`` evenly spaced frames.

    Every cell is ``max H`` x ``max W`` over the layers; the sheet is
    ``PAD + cols * (W + PAD)`` wide and ``PAD + rows * (LABEL_H + H + PAD)`` tall
    (wider if a label needs it). RGBA layers are shown over a checkerboard, masks as grey.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise LayerkitError(f"preview sheet '{path}' must have a .png suffix.")
    if not layers:
        raise LayerkitError("write_preview_sheet needs at least one layer, got none.")
    if max_frames < 1:
        raise LayerkitError(f"max_frames must be a positive integer, got {max_frames}.")
    rows = {name: _to_rgb(frames, name) for name, frames in layers.items()}
    rows = {name: frames[_pick(len(frames), max_frames)] for name, frames in rows.items()}
    cell_h = max(f.shape[1] for f in rows.values())
    cell_w = max(f.shape[2] for f in rows.values())
    cols = max(len(f) for f in rows.values())

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textbbox((0, 0), name, font=font)[2] for name in rows)
    width = max(PAD + cols * (cell_w + PAD), label_w + 2 * PAD)
    height = PAD + len(rows) * (LABEL_H + cell_h + PAD)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, (name, frames) in enumerate(rows.items()):
        top = PAD + r * (LABEL_H + cell_h + PAD)
        draw.text((PAD, top), name, fill=(255, 255, 255), font=font)
        for c, frame in enumerate(frames):
            sheet.paste(Image.fromarray(frame), (PAD + c * (cell_w + PAD), top + LABEL_H))

    with atomic_output(path, overwrite=overwrite) as tmp:
        sheet.save(tmp, format="PNG")
    return path
