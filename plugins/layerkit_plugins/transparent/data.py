"""Datasets for transparent video: ``shapes_rgba`` (shapes-world sprites on a transparent
background), ``transparent.rgba_folder`` (a folder of RGBA videos with captions; see
docs/transparent_data.md) and ``transparent.sampling_only`` (the placeholder data of
sampling-only experiments)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.errors import LayerkitError


def make_rgba_sprite_clip(seed: int, config: Any = None, *, opaque: bool = False) -> dict[str, Any]:
    """One sprite on a transparent background: ``rgba`` [F, 4, H, W] (straight alpha, rgb 0.5 where
    alpha is 0), ``prompt`` (e.g. "a red circle moving right"), ``meta`` (the sprite's
    shape/colour/direction/size/speed/start/velocity plus num_frames/height/width) and ``seed``.

    ``opaque``: the same sprite over its moving textured background instead, alpha 1 everywhere
    (ordinary RGB video, what a motion module such as AnimateDiff's is trained on)."""
    from dataclasses import replace

    from layerkit.data.shapes import ShapesConfig, make_sample

    cfg = replace(config if config is not None else ShapesConfig(), num_sprites=1)
    sample = make_sample(seed, cfg)
    meta = {**sample["meta"]["sprites"][0], "num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width}
    if opaque:
        rgba = torch.cat([sample["blended"], torch.ones_like(sample["foreground_alpha"])], 1)
    else:
        rgba = torch.cat([sample["foreground_rgb"], sample["foreground_alpha"]], 1)
    return {"rgba": rgba, "prompt": sample["foreground_prompt"], "meta": meta, "seed": seed}


class RGBASpriteClips(torch.utils.data.Dataset):
    """Item i: ``make_rgba_sprite_clip(seed_for(split, seed, i), config)`` -> ``rgba`` [F, 4, H, W]
    in [0, 1] (straight alpha), ``prompt`` ("a red circle moving right"), ``meta``, ``seed``.
    ``opaque=True``: the sprite over its background, alpha 1 (ordinary RGB clips)."""

    def __init__(self, size: int = 256, seed: int = 0, split: str = "train", opaque: bool = False,
                 **config: Any) -> None:
        from layerkit.data.shapes import ShapesConfig, seed_for

        if size < 1:
            raise LayerkitError(f"shapes_rgba needs a positive size; got {size}.")
        seed_for(split, seed, 0)  # validates split and seed
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        config.pop("num_sprites", None)  # always one sprite
        self.config = ShapesConfig(**config)
        self.config.validate()
        self.size, self.seed, self.split, self.opaque = size, seed, split, bool(opaque)

    cacheable = True  # item i is the same every epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        from layerkit.data.shapes import seed_for

        if not 0 <= index < self.size:
            raise IndexError(f"shapes_rgba index {index} out of range for size {self.size}.")
        return make_rgba_sprite_clip(seed_for(self.split, self.seed, index), self.config, opaque=self.opaque)


# ----------------------------------------------------------------------------------------
# transparent.rgba_folder: RGBA videos with captions, for stage-2 training on real data
# ----------------------------------------------------------------------------------------
VIDEO_SUFFIXES = (".mov", ".webm")
#: containers/codecs that cannot carry an alpha plane: named in an error rather than skipped
NO_ALPHA_SUFFIXES = (".mp4", ".m4v", ".avi", ".gif", ".jpg", ".jpeg")
CAPTIONS_JSON = "captions.json"


@dataclass
class _Item:
    path: Path
    kind: str  # "video" | "png"
    caption: str
    frames: int | None = None  # None: unknown until decoded
    pngs: list[Path] = field(default_factory=list)


class RGBAFolder(torch.utils.data.Dataset):
    """A folder of RGBA clips with captions -> ``rgba`` [F, 4, H, W] in [0, 1] + ``prompt``.

    Items (top level of ``root``, sorted by name): ``*.mov`` (ProRes 4444 with alpha),
    ``*.webm`` (VP9 with alpha) and directories of ``*.png`` frames (RGBA, in the order of
    their numbers; a sequence whose numbers skip one is refused unless ``allow_gaps``). 16-bit
    sources keep their depth until they are scaled to floats. Each needs a caption: ``<name>.txt`` beside it (``clip.mov`` -> ``clip.txt``,
    directory ``clip/`` -> ``clip.txt``) or an entry in ``captions.json`` keyed by the file
    name or its stem; a ``.txt`` wins over the JSON entry.

    A clip is ``num_frames`` frames taken every ``stride`` frames from a start that is random
    (``clip_start=random``, drawn from torch's generator, which training seeds) or 0
    (``first``). Frames are scaled to cover ``height`` x ``width`` and cropped (``center`` or
    ``random``); colour is scaled premultiplied by alpha, so transparent pixels do not bleed
    into edges, and returned straight.

    With ``probe=true`` (default) every item is checked when the dataset is built, without
    decoding frames: readable container, an alpha plane, a caption, enough frames. Problems
    are collected and reported in one LayerkitError sentence naming the files.
    """

    def __init__(self, root: str | None = None, num_frames: int = 16, height: int = 64, width: int = 64,
                 stride: int = 1, clip_start: str = "random", crop: str = "center", probe: bool = True,
                 allow_gaps: bool = False) -> None:
        if not root:
            raise LayerkitError("transparent.rgba_folder needs data.root: a folder of RGBA videos with captions.")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise LayerkitError(f"data.root '{self.root}' is not a folder.")
        for key, value in (("num_frames", num_frames), ("height", height), ("width", width), ("stride", stride)):
            if int(value) < 1:
                raise LayerkitError(f"transparent.rgba_folder needs a positive {key}; got {value}.")
        if clip_start not in ("random", "first"):
            raise LayerkitError(f"clip_start must be 'random' or 'first'; got '{clip_start}'.")
        if crop not in ("center", "random"):
            raise LayerkitError(f"crop must be 'center' or 'random'; got '{crop}'.")
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.stride, self.clip_start, self.crop = int(stride), clip_start, crop
        self.allow_gaps = bool(allow_gaps)
        self.items = self._scan()
        if probe:
            self._probe_all()

    @property
    def span(self) -> int:
        """Source frames one clip covers: (F - 1) * stride + 1."""
        return (self.num_frames - 1) * self.stride + 1

    # -- building the index -------------------------------------------------------------------
    def _scan(self) -> list[_Item]:
        captions = self._captions_json()
        items, missing, no_alpha = [], [], []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                continue
            suffix = path.suffix.lower()
            if path.is_dir():
                if not any(p.suffix.lower() == ".png" and p.is_file() for p in path.iterdir()):
                    continue  # not a PNG sequence
                from layerkit.io.video import png_sequence

                pngs = png_sequence(path, allow_gaps=self.allow_gaps)  # in frame order; a gap is refused
                kind = "png"
            elif suffix in VIDEO_SUFFIXES:
                pngs, kind = [], "video"
            elif suffix in NO_ALPHA_SUFFIXES:
                no_alpha.append(path.name)
                continue
            else:
                continue  # captions, notes, anything else
            caption = self._caption(path, captions)
            if caption is None:
                missing.append(path.name)
                continue
            items.append(_Item(path, kind, caption, len(pngs) if pngs else None, pngs))
        if no_alpha:
            raise LayerkitError(
                f"{_names(no_alpha)} in '{self.root}' cannot hold an alpha channel; convert to ProRes 4444 .mov, "
                "VP9 .webm with alpha or an RGBA PNG-sequence folder, or move them out of data.root."
            )
        if missing:
            raise LayerkitError(
                f"no caption for {_names(missing)} in '{self.root}': add <name>.txt beside each clip "
                f"or an entry keyed by its file name in {CAPTIONS_JSON}."
            )
        if not items:
            raise LayerkitError(
                f"'{self.root}' holds no RGBA clips (*.mov ProRes 4444, *.webm VP9 with alpha, or folders of PNGs)."
            )
        return items

    def _captions_json(self) -> dict[str, str]:
        path = self.root / CAPTIONS_JSON
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LayerkitError(f"'{path}' is not valid JSON ({exc}); it must map clip names to captions.") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise LayerkitError(f"'{path}' must map clip names to caption strings.")
        return data

    @staticmethod
    def _caption(path: Path, captions: dict[str, str]) -> str | None:
        txt = path.parent / f"{path.stem if path.is_file() else path.name}.txt"
        text = None
        if txt.is_file():
            text = txt.read_text(encoding="utf-8")
        else:
            text = captions.get(path.name, captions.get(path.stem))
        if text is None or not text.strip():
            return None
        return " ".join(text.split())

    def _probe_all(self) -> None:
        problems: dict[str, list[str]] = {"unreadable": [], "no_alpha": [], "short": []}
        reasons: dict[str, str] = {}
        for item in self.items:
            try:
                has_alpha, frames = self._probe(item)
            except LayerkitError as exc:
                problems["unreadable"].append(item.path.name)
                reasons.setdefault("unreadable", str(exc))
                continue
            item.frames = frames
            if not has_alpha:
                problems["no_alpha"].append(item.path.name)
            elif frames is not None and frames < self.span:
                problems["short"].append(f"{item.path.name} ({frames} frames)")
        if problems["unreadable"]:
            raise LayerkitError(
                f"{_names(problems['unreadable'])} in '{self.root}' could not be read (corrupt or not a video); "
                f"first error: {reasons['unreadable'].rstrip('.')}."
            )
        if problems["no_alpha"]:
            raise LayerkitError(
                f"{_names(problems['no_alpha'])} in '{self.root}' {_verb(problems['no_alpha'], 'has', 'have')} "
                "no alpha channel; re-export as "
                "ProRes 4444 .mov with alpha, VP9 .webm with alpha, or RGBA PNGs."
            )
        if problems["short"]:
            raise LayerkitError(
                f"{_names(problems['short'])} in '{self.root}' {_verb(problems['short'], 'is', 'are')} shorter than "
                f"one clip of {self.num_frames} frames "
                f"every {self.stride} ({self.span} frames); lower data.num_frames or data.stride."
            )

    @staticmethod
    def _probe(item: _Item) -> tuple[bool, int | None]:
        """(has an alpha plane, frame count or None) without decoding frames."""
        if item.kind == "png":
            from PIL import Image

            try:
                with Image.open(item.pngs[0]) as im:
                    alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            except (OSError, ValueError) as exc:
                raise LayerkitError(f"could not read image '{item.pngs[0]}': {exc}") from None
            return alpha, len(item.pngs)
        import av

        try:
            with av.open(str(item.path)) as container:
                if not container.streams.video:
                    raise LayerkitError(f"'{item.path}' has no video stream")
                stream = container.streams.video[0]
                fmt = stream.codec_context.format
                meta = {k.lower(): v for k, v in stream.metadata.items()}
                alpha = meta.get("alpha_mode") == "1" or bool(fmt and any(c.is_alpha for c in fmt.components))
                frames = int(stream.frames or 0)
                rate = stream.average_rate or stream.guessed_rate
                if not frames and container.duration and rate:
                    frames = int(round(container.duration / 1_000_000 * float(rate)))
        except av.FFmpegError as exc:
            raise LayerkitError(f"could not open '{item.path}': {(exc.strerror or str(exc)).lower()}") from None
        return alpha, frames or None

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"transparent.rgba_folder index {index} out of range for {len(self.items)} clips.")
        item = self.items[index]
        start = self._start(item.frames)
        frames, fps, start = self._read(item, start)
        from layerkit.io.video import unit_float

        rgba = self._resize_crop(torch.from_numpy(unit_float(frames)).permute(0, 3, 1, 2))
        return {"rgba": rgba, "prompt": item.caption,
                "meta": {"path": str(item.path), "start": start, "stride": self.stride, "fps": fps}}

    def _start(self, frames: int | None) -> int:
        if self.clip_start == "first" or frames is None or frames <= self.span:
            return 0
        return int(torch.randint(0, frames - self.span + 1, ()).item())

    def _read(self, item: _Item, start: int) -> tuple[Any, float, int]:
        """[F, H, W, 4] of the clip's frames (uint8, or uint16 from a deeper source), the source fps,
        the start actually used."""
        import numpy as np

        from layerkit.io.video import DEFAULT_FPS, read_images, read_video

        if item.kind == "png":
            picks = item.pngs[start : start + self.span : self.stride]
            if len(picks) < self.num_frames:
                raise LayerkitError(f"'{item.path}' has {len(item.pngs)} frames; a clip needs {self.span}.")
            frames, fps = read_images(picks, item.path), DEFAULT_FPS
        else:
            video = read_video(item.path, max_frames=start + self.span)
            if video.num_frames < start + self.span:  # the container's count was an estimate
                if video.num_frames < self.span:
                    raise LayerkitError(
                        f"'{item.path}' decodes to {video.num_frames} frames; a clip of {self.num_frames} frames "
                        f"every {self.stride} needs {self.span}."
                    )
                start = video.num_frames - self.span
            frames, fps = video.frames[start : start + self.span : self.stride], video.fps
        if frames.shape[-1] != 4:
            raise LayerkitError(
                f"'{item.path}' has no alpha channel; re-export it as ProRes 4444 .mov with alpha, "
                "VP9 .webm with alpha, or RGBA PNGs."
            )
        return np.ascontiguousarray(frames), float(fps), start

    def _resize_crop(self, rgba: torch.Tensor) -> torch.Tensor:
        """[F, 4, h, w] straight RGBA in [0, 1] -> [F, 4, H, W]: cover, crop, premultiplied scaling."""
        h, w = rgba.shape[-2:]
        scale = max(self.height / h, self.width / w)
        size = (max(self.height, round(h * scale)), max(self.width, round(w * scale)))
        alpha = rgba[:, 3:]
        if size != (h, w):
            premul = torch.cat([rgba[:, :3] * alpha, alpha], dim=1)
            premul = F.interpolate(premul, size=size, mode="bilinear", align_corners=False,
                                   antialias=scale < 1).clamp(0, 1)
            alpha = premul[:, 3:]
            colour = torch.where(alpha > 1 / 512, premul[:, :3] / alpha.clamp_min(1 / 512), torch.zeros_like(alpha))
            rgba = torch.cat([colour.clamp(0, 1), alpha], dim=1)
        top, left = size[0] - self.height, size[1] - self.width
        if self.crop == "random":
            top = int(torch.randint(0, top + 1, ()).item())
            left = int(torch.randint(0, left + 1, ()).item())
        else:
            top, left = top // 2, left // 2
        return rgba[..., top : top + self.height, left : left + self.width].contiguous()


def _verb(names: list[str], one: str, many: str) -> str:
    return one if len(names) == 1 else many


def _names(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(f"'{n}'" for n in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{listed}{more}"


class SamplingOnly(torch.utils.data.Dataset):
    """The ``data`` of sampling-only experiments (the paper's baselines, which train nothing):
    building it for training fails with a sentence saying so."""

    def __init__(self, experiment: str = "this experiment", reason: str = "", **unused: Any) -> None:
        raise LayerkitError(
            f"experiment '{experiment}' is sampling-only: {reason or 'it trains nothing'}; "
            f"run it with 'layerkit sample +experiment={experiment}'."
        )
