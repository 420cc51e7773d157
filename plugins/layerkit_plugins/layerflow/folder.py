"""LayerFlow training data from files (format: docs/layerflow_data.md).

- ``layerflow.folder``: one sub-directory per layered video (foreground RGBA, or RGB + alpha;
  background; blended, composited when absent; ``prompts.json``);
- ``layerflow.images``: the same layout with still images, each held for every frame ("images as
  frozen videos", LayerFlow sec. 3.2; ``is_static`` True);
- ``layerflow.copy_paste``: an RGBA foreground clip from one pool pasted over a background clip
  from another, as a dynamic or a frozen (one frame repeated) sample;
- ``layerflow.mix``: named datasets drawn by weight with a seed (stage 3: images 0.8 +
  copy-paste 0.2).

Every sample carries what the layered task reads: ``foreground_rgb`` [F, 3, H, W],
``foreground_alpha`` [F, 1, H, W], ``background`` and ``blended`` [F, 3, H, W] (all float in
[0, 1]), ``foreground_prompt``, ``background_prompt``, ``prompt``, ``is_static`` (bool) and
``source`` (where it came from). Items are deterministic in (seed, index).

Alpha is straight (not premultiplied): blended = fg x alpha + bg x (1 - alpha).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from layerkit.errors import LayerkitError

VIDEO_KEYS = ("foreground_rgb", "foreground_alpha", "background", "blended")
PROMPT_KEYS = ("foreground_prompt", "background_prompt", "prompt")
SAMPLE_KEYS = (*VIDEO_KEYS, *PROMPT_KEYS, "is_static", "source")
VIDEO_SUFFIXES = (".mov", ".webm", ".mp4", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESIZE_MODES = ("stretch", "crop")
DEFAULT_BLENDED_PROMPT = "{foreground} over {background}"


# ----------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------
def _unset(value: Any) -> bool:
    return value is None or str(value) in ("", "???", "None")


def check_root(root: Any, what: str, key: str) -> Path:
    if _unset(root):
        raise LayerkitError(f"{what} needs a directory: set {key}=/path/to/it.")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise LayerkitError(f"{what} directory '{path}' does not exist.")
    return path


def find_layer(folder: Path, name: str, *, videos: bool = True) -> Path | None:
    """The file of layer ``name`` in ``folder``: ``name.<video suffix>``, ``name.<image suffix>``
    or a PNG-sequence directory ``name/`` or ``name_png/``; None when absent."""
    suffixes = (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES) if videos else IMAGE_SUFFIXES
    found = []
    for path in folder.iterdir():
        if path.is_file() and path.stem == name and path.suffix.lower() in suffixes or videos and path.is_dir() and path.name in (name, f"{name}_png"):
            found.append(path)
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p in found))
        raise LayerkitError(f"'{folder}' holds more than one {name} layer ({names}); keep one.")
    return found[0] if found else None


def count_frames(path: Path) -> int:
    """Frames in a video file, PNG directory or image, without decoding a video."""
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return 1
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise LayerkitError(f"could not decode '{path}': it has no video stream.")
            stream = container.streams.video[0]
            if stream.frames and stream.frames > 0:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as exc:
        raise LayerkitError(f"could not decode '{path}': it is not a readable video ({exc.strerror or exc}).") from None


def read_frames(path: Path, indices: Sequence[int]) -> torch.Tensor:
    """Frames ``indices`` of a file as float [F, C, H, W] in [0, 1] (C = 3 or 4)."""
    from layerkit.io.video import read_video, unit_float

    video = read_video(path, max_frames=max(indices) + 1)
    if video.num_frames <= max(indices):
        raise LayerkitError(f"'{path}' decoded to {video.num_frames} frames; frame {max(indices)} is needed.")
    return torch.from_numpy(unit_float(video.frames[list(indices)])).permute(0, 3, 1, 2)


def fit(frames: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize [F, C, h, w] to [F, C, height, width]: ``stretch`` (aspect not kept) or ``crop``
    (scaled to cover, centre crop). Frames already at the size are returned as they are."""
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames
    if mode == "crop":
        scale = max(height / h, width / w)
        size = (max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6)))
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        return frames[..., top : top + height, left : left + width].clamp(0, 1).contiguous()
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def frame_indices(total: int, num_frames: int, stride: int, rng: random.Random | None, what: str) -> list[int]:
    """``num_frames`` indices ``stride`` apart: from the first frame, or (``rng`` given) from a
    random start that keeps them all inside the clip."""
    span = (num_frames - 1) * stride + 1
    if total < span:
        raise LayerkitError(
            f"{what} has {total} frame(s); num_frames={num_frames} with stride={stride} needs at least {span}."
        )
    start = rng.randrange(total - span + 1) if rng is not None else 0
    return list(range(start, start + span, stride))


def read_prompts(path: Path, blended_template: str | None = DEFAULT_BLENDED_PROMPT,
                 required: Sequence[str] = ("foreground", "background")) -> dict[str, str]:
    """``prompts.json``: an object of strings; ``blended`` defaults to ``blended_template``."""
    if not path.is_file():
        raise LayerkitError(f"'{path}' is missing; every sample needs prompts.json with "
                            f"{', '.join(repr(k) for k in (*required, 'blended'))}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayerkitError(f"'{path}' is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise LayerkitError(f"'{path}' must hold a JSON object like "
                            '{"foreground": "...", "background": "...", "blended": "..."}, '
                            f"not a {type(data).__name__}.")
    missing = [k for k in required if k not in data]
    if missing:
        raise LayerkitError(f"'{path}' lacks the prompt(s) {', '.join(repr(k) for k in missing)}.")
    wrong = [k for k, v in data.items() if not isinstance(v, str)]
    if wrong:
        raise LayerkitError(f"'{path}': prompt {wrong[0]!r} must be a string, not {type(data[wrong[0]]).__name__}.")
    out = dict(data)
    if "blended" not in out and blended_template is not None:
        out["blended"] = blended_template.format(foreground=out["foreground"], background=out["background"])
    return out


def composite(fg: torch.Tensor, alpha: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    return fg * alpha + bg * (1 - alpha)


def freeze(sample: dict[str, Any], frame: int) -> dict[str, Any]:
    """Every video of ``sample`` holds frame ``frame`` on all its frames (a static sample)."""
    for key in VIDEO_KEYS:
        video = sample[key]
        sample[key] = video[frame : frame + 1].expand_as(video).contiguous()
    sample["is_static"] = True
    return sample


def item_rng(seed: int, index: int, salt: int) -> random.Random:
    return random.Random((int(seed) * 1_000_003 + int(index)) * 8191 + salt)


def _check_sizes(num_frames: int, height: int, width: int, stride: int = 1) -> None:
    for key, value in (("num_frames", num_frames), ("height", height), ("width", width), ("stride", stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayerkitError(f"{key} must be a positive integer; got {value!r}.")


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise LayerkitError(f"{name} must lie in [0, 1]; got {value}.")
    return float(value)


# ----------------------------------------------------------------------------------------
# layered samples on disk
# ----------------------------------------------------------------------------------------
class LayeredFolder(Dataset):
    """``layerflow.folder``: ``root/<sample>/`` with ``foreground`` (RGBA, or RGB + ``alpha``),
    ``background``, optional ``blended`` and ``prompts.json``.

    ``num_frames`` frames ``stride`` apart are taken from the first frame (``random_start``: from
    a random one), resized to ``height`` x ``width`` (``resize``: stretch | crop).
    ``static_fraction``: share of samples frozen on one random frame (``is_static`` True).
    ``copy_paste``: the foreground of each sample over the background of another (blended
    recomposited, prompt from ``blended_prompt``). ``size``: items per epoch (default: one per
    sample folder; more wrap around with new random choices).
    """

    still_images = False
    kind = "layerflow.folder"

    def __init__(self, root: str | None = None, num_frames: int = 8, height: int = 32, width: int = 32,
                 stride: int = 1, random_start: bool = False, resize: str = "stretch", seed: int = 0,
                 size: int | None = None, static_fraction: float = 0.0, copy_paste: bool = False,
                 blended_prompt: str = DEFAULT_BLENDED_PROMPT) -> None:
        _check_sizes(num_frames, height, width, stride)
        if resize not in RESIZE_MODES:
            raise LayerkitError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}.")
        self.root = check_root(root, f"dataset '{self.kind}'", "data.root")
        self.num_frames, self.height, self.width, self.stride = num_frames, height, width, stride
        self.random_start, self.resize, self.seed = bool(random_start), resize, int(seed)
        self.static_fraction = _check_fraction("static_fraction", static_fraction)
        self.copy_paste, self.blended_prompt = bool(copy_paste), blended_prompt
        self.samples = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.samples:
            raise LayerkitError(f"dataset directory '{self.root}' has no sample folders; see docs/layerflow_data.md.")
        self.files = [self._files(p) for p in self.samples]
        self.prompts = [read_prompts(p / "prompts.json", blended_prompt) for p in self.samples]
        if self.copy_paste and len(self.samples) < 2:
            raise LayerkitError(f"copy_paste needs at least two sample folders in '{self.root}'.")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise LayerkitError(f"dataset size must be a positive integer or null; got {size!r}.")
        self.size = int(size) if size is not None else len(self.samples)

    def _files(self, folder: Path) -> dict[str, Path | None]:
        videos = not self.still_images
        files = {name: find_layer(folder, name, videos=videos) for name in ("foreground", "alpha", "background",
                                                                            "blended")}
        kinds = "an image (.png, .jpg)" if self.still_images else "a video (.mov, .webm, .mp4, ...), an image or a PNG directory"
        for name in ("foreground", "background"):
            if files[name] is None:
                raise LayerkitError(f"sample '{folder}' has no {name} layer; add {name}.<ext>, {kinds}.")
        return files

    def __len__(self) -> int:
        return self.size

    # -- reading ----------------------------------------------------------------------------
    def _indices(self, files: dict[str, Path | None], folder: Path, rng: random.Random) -> dict[str, list[int]]:
        counts = {name: count_frames(path) for name, path in files.items() if path is not None}
        if self.still_images:
            many = {files[n].name: c for n, c in counts.items() if c != 1}  # type: ignore[union-attr]
            if many:
                raise LayerkitError(f"sample '{folder}': {', '.join(many)} hold more than one frame; "
                                    "layerflow.images takes one image per layer.")
            return {name: [0] * self.num_frames for name in counts}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{files[n].name} {c}" for n, c in counts.items())  # type: ignore[union-attr]
            raise LayerkitError(f"sample '{folder}': the layers have different frame counts ({listed}); "
                                "every layer needs the same number of frames.")
        total = next(iter(counts.values()))
        idx = frame_indices(total, self.num_frames, self.stride, rng if self.random_start else None, f"sample '{folder}'")
        return {name: idx for name in counts}

    def _load(self, files: dict[str, Path | None], indices: dict[str, list[int]], folder: Path) -> dict[str, torch.Tensor]:
        def load(name: str) -> torch.Tensor:
            path = files[name]
            assert path is not None
            unique = sorted(set(indices[name]))
            frames = fit(read_frames(path, unique), self.height, self.width, self.resize)
            return frames[[unique.index(i) for i in indices[name]]]

        fg = load("foreground")
        if files["alpha"] is not None:
            alpha = load("alpha")[:, :3].mean(1, keepdim=True)
        elif fg.shape[1] == 4:
            alpha = fg[:, 3:]
        else:
            raise LayerkitError(f"sample '{folder}': foreground '{files['foreground'].name}' has no alpha channel "  # type: ignore[union-attr]
                                "and there is no alpha layer; give an RGBA foreground (.mov ProRes 4444, .webm VP9, "
                                "RGBA PNGs) or an alpha.<ext> matte.")
        out = {"foreground_rgb": fg[:, :3].contiguous(), "foreground_alpha": alpha.contiguous(),
               "background": load("background")[:, :3].contiguous()}
        if files["blended"] is not None:
            out["blended"] = load("blended")[:, :3].contiguous()
        else:
            out["blended"] = composite(out["foreground_rgb"], out["foreground_alpha"], out["background"])
        return out

    def read(self, i: int, rng: random.Random) -> dict[str, Any]:
        """Sample folder ``i`` as a layered sample (no copy-paste, not frozen)."""
        folder, files, prompts = self.samples[i], self.files[i], self.prompts[i]
        videos = self._load(files, self._indices(files, folder, rng), folder)
        return {**videos, "foreground_prompt": prompts["foreground"], "background_prompt": prompts["background"],
                "prompt": prompts["blended"], "is_static": self.still_images, "source": str(folder)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.kind} index {index} out of range for size {self.size}.")
        rng = item_rng(self.seed, index, 0x1F)
        i = index % len(self.samples)
        sample = self.read(i, rng)
        if self.copy_paste:
            j = (i + 1 + rng.randrange(len(self.samples) - 1)) % len(self.samples)
            other = self.read(j, rng)
            sample["background"] = other["background"]
            sample["blended"] = composite(sample["foreground_rgb"], sample["foreground_alpha"], other["background"])
            sample["background_prompt"] = other["background_prompt"]
            sample["prompt"] = self.blended_prompt.format(foreground=sample["foreground_prompt"],
                                                          background=other["background_prompt"])
            sample["source"] = f"{sample['source']} over {other['source']}"
        if not self.still_images and rng.random() < self.static_fraction:
            freeze(sample, rng.randrange(self.num_frames))
        return sample


class LayeredImages(LayeredFolder):
    """``layerflow.images``: ``root/<sample>/`` with ``foreground.png`` (RGBA, or RGB +
    ``alpha.png``), ``background.png``, optional ``blended.png`` and ``prompts.json``; each image
    is held for all ``num_frames`` frames and ``is_static`` is True (LayerFlow stage 3).

    ``copy_paste``: the foreground of each sample over the background of another.
    ``static_fraction`` is accepted for the stage experiments' sake and has no effect: images are
    always static.
    """

    still_images = True
    kind = "layerflow.images"

    def __init__(self, root: str | None = None, num_frames: int = 8, height: int = 32, width: int = 32,
                 resize: str = "stretch", seed: int = 0, size: int | None = None, static_fraction: float = 1.0,
                 copy_paste: bool = False, blended_prompt: str = DEFAULT_BLENDED_PROMPT) -> None:
        _check_fraction("static_fraction", static_fraction)
        super().__init__(root, num_frames=num_frames, height=height, width=width, resize=resize, seed=seed,
                         size=size, copy_paste=copy_paste, blended_prompt=blended_prompt)


# ----------------------------------------------------------------------------------------
# copy-paste over files
# ----------------------------------------------------------------------------------------
class Pool:
    """A directory of clips (video files, PNG directories, images) and their ``prompts.json``
    (file or directory name without suffix -> prompt)."""

    def __init__(self, root: Any, what: str, key: str) -> None:
        self.root = check_root(root, what, key)
        self.clips = sorted(
            p for p in self.root.iterdir() if not p.name.startswith(".") and (
                p.is_dir() or (p.is_file() and p.suffix.lower() in (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES)))
        )
        if not self.clips:
            raise LayerkitError(f"{what} directory '{self.root}' holds no clips (video files, PNG directories or images).")
        stems = [p.stem if p.is_file() else p.name for p in self.clips]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise LayerkitError(f"{what} directory '{self.root}' holds more than one clip named '{twice[0]}'.")
        path = self.root / "prompts.json"
        prompts = read_prompts(path, None, required=())
        missing = [s for s in stems if s not in prompts]
        if missing:
            raise LayerkitError(f"'{path}' has no prompt for {', '.join(repr(s) for s in missing[:3])}"
                                f"{' and more' if len(missing) > 3 else ''}; map each clip name to its prompt.")
        self.prompts = [prompts[s] for s in stems]

    def __len__(self) -> int:
        return len(self.clips)


class CopyPaste(Dataset):
    """``layerflow.copy_paste``: RGBA foreground clips (``foregrounds``: .mov ProRes 4444, .webm
    VP9, RGBA PNG directories) pasted over background clips (``backgrounds``: any video).

    Item ``i`` takes foreground ``i mod n`` and a background drawn with the seed; ``scale``
    [lo, hi] shrinks the foreground to a random fraction of the frame at a random place (1: the
    whole frame). ``static_fraction``: share of items frozen on one frame (``is_static`` True;
    LayerFlow's Motion LoRA then runs at scale 1). ``size`` defaults to the number of foregrounds.
    """

    def __init__(self, foregrounds: str | None = None, backgrounds: str | None = None, num_frames: int = 8,
                 height: int = 32, width: int = 32, stride: int = 1, random_start: bool = True,
                 resize: str = "stretch", seed: int = 0, size: int | None = None, static_fraction: float = 0.0,
                 scale: Sequence[float] = (1.0, 1.0), copy_paste: bool = True,
                 blended_prompt: str = DEFAULT_BLENDED_PROMPT) -> None:
        _check_sizes(num_frames, height, width, stride)
        if not copy_paste:
            raise LayerkitError("layerflow.copy_paste always copy-pastes; use layerflow.folder for layered videos as they are.")
        if resize not in RESIZE_MODES:
            raise LayerkitError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}.")
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise LayerkitError(f"scale must be [lo, hi] with 0 < lo <= hi <= 1; got {list(scale)}.")
        self.fg = Pool(foregrounds, "copy-paste foregrounds", "data.foregrounds")
        self.bg = Pool(backgrounds, "copy-paste backgrounds", "data.backgrounds")
        self.num_frames, self.height, self.width, self.stride = num_frames, height, width, stride
        self.random_start, self.resize, self.seed, self.scale = bool(random_start), resize, int(seed), (lo, hi)
        self.static_fraction = _check_fraction("static_fraction", static_fraction)
        self.blended_prompt = blended_prompt
        if size is not None and (not isinstance(size, int) or size < 1):
            raise LayerkitError(f"dataset size must be a positive integer or null; got {size!r}.")
        self.size = int(size) if size is not None else len(self.fg)

    def __len__(self) -> int:
        return self.size

    def _clip(self, path: Path, rng: random.Random) -> torch.Tensor:
        total = count_frames(path)
        if total == 1:  # a still image: held on every frame
            return read_frames(path, [0]).expand(self.num_frames, -1, -1, -1)
        idx = frame_indices(total, self.num_frames, self.stride, rng if self.random_start else None, f"clip '{path}'")
        return read_frames(path, idx)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"layerflow.copy_paste index {index} out of range for size {self.size}.")
        rng = item_rng(self.seed, index, 0xC9)
        i, j = index % len(self.fg), rng.randrange(len(self.bg))
        fg_path, bg_path = self.fg.clips[i], self.bg.clips[j]
        fg = self._clip(fg_path, rng)
        if fg.shape[1] != 4:
            raise LayerkitError(f"foreground clip '{fg_path}' has no alpha channel; copy-paste foregrounds must be RGBA "
                                "(.mov ProRes 4444, .webm VP9 with alpha, RGBA PNGs).")
        background = fit(self._clip(bg_path, rng), self.height, self.width, self.resize)[:, :3].contiguous()
        s = rng.uniform(*self.scale)
        if s >= 1.0:
            fg = fit(fg, self.height, self.width, self.resize)
        else:
            h, w = max(1, round(self.height * s)), max(1, round(self.width * s))
            small = fit(fg, h, w, self.resize)
            top, left = rng.randrange(self.height - h + 1), rng.randrange(self.width - w + 1)
            fg = fg.new_zeros(fg.shape[0], 4, self.height, self.width)
            fg[..., top : top + h, left : left + w] = small
        rgb, alpha = fg[:, :3].contiguous(), fg[:, 3:].contiguous()
        fg_prompt, bg_prompt = self.fg.prompts[i], self.bg.prompts[j]
        sample = {"foreground_rgb": rgb, "foreground_alpha": alpha, "background": background,
                  "blended": composite(rgb, alpha, background), "foreground_prompt": fg_prompt,
                  "background_prompt": bg_prompt,
                  "prompt": self.blended_prompt.format(foreground=fg_prompt, background=bg_prompt),
                  "is_static": False, "source": f"{fg_path} over {bg_path}"}
        if rng.random() < self.static_fraction:
            freeze(sample, rng.randrange(self.num_frames))
        return sample


# ----------------------------------------------------------------------------------------
# mixture of named datasets
# ----------------------------------------------------------------------------------------
class Mix(Dataset):
    """``layerflow.mix``: item ``i`` comes from a child dataset drawn by ``weights`` with the seed,
    and from a random item of it. ``datasets``: name -> a dataset config (``name`` + its options);
    ``num_frames``, ``height``, ``width`` are handed to every child that does not set them, and
    every sample must come out at that size. Samples keep the layered keys, ``is_static``,
    ``source`` and gain ``dataset`` (the child's name).

    ``static_fraction`` and ``copy_paste`` (which LayerFlow's stage experiments put in ``data``)
    are accepted and ignored: each child decides for itself.
    """

    def __init__(self, datasets: Mapping[str, Mapping[str, Any]] | None = None,
                 weights: Mapping[str, float] | None = None, size: int = 1000, seed: int = 0, num_frames: int = 8,
                 height: int = 32, width: int = 32, static_fraction: float | None = None,
                 copy_paste: bool | None = None) -> None:
        from layerkit.registry import get_registry

        _check_sizes(num_frames, height, width)
        if not datasets:
            raise LayerkitError("layerflow.mix needs datasets: a mapping of names to dataset configs.")
        weights = dict(weights or {name: 1.0 for name in datasets})
        if set(weights) != set(datasets):
            raise LayerkitError(f"layerflow.mix weights name {sorted(weights)} but the datasets are {sorted(datasets)}; "
                                "give one weight per dataset.")
        if any(not isinstance(w, int | float) or w < 0 or not math.isfinite(w) for w in weights.values()) \
                or sum(weights.values()) <= 0:
            raise LayerkitError(f"layerflow.mix weights must be non-negative numbers with a positive sum; got {weights}.")
        if not isinstance(size, int) or size < 1:
            raise LayerkitError(f"dataset size must be a positive integer; got {size!r}.")
        self.size, self.seed = size, int(seed)
        self.num_frames, self.height, self.width = num_frames, height, width
        registry = get_registry()
        self.children: dict[str, Dataset] = {}
        for key, node in datasets.items():
            if not isinstance(node, Mapping) or "name" not in node:
                raise LayerkitError(f"layerflow.mix dataset '{key}' must be a mapping with a 'name' key naming a dataset.")
            if node["name"] == "layerflow.mix":
                raise LayerkitError(f"layerflow.mix dataset '{key}' is itself a layerflow.mix; nest weights instead.")
            kwargs = {k: v for k, v in node.items() if k != "name"}
            for k in ("num_frames", "height", "width"):
                kwargs.setdefault(k, getattr(self, k))
            child = registry.build("dataset", node["name"], **kwargs)
            if len(child) == 0:  # type: ignore[arg-type]
                raise LayerkitError(f"layerflow.mix dataset '{key}' is empty.")
            self.children[key] = child
        total = float(sum(weights.values()))
        self.names = [k for k in datasets if weights[k] > 0]
        self.cumulative, running = [], 0.0
        for name in self.names:
            running += weights[name] / total
            self.cumulative.append(running)

    def __len__(self) -> int:
        return self.size

    def pick(self, index: int) -> tuple[str, int]:
        """The child name and the child item of mix item ``index``."""
        rng = item_rng(self.seed, index, 0x3A)
        u = rng.random()
        name = next((n for n, c in zip(self.names, self.cumulative, strict=True) if u < c), self.names[-1])
        return name, rng.randrange(len(self.children[name]))  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"layerflow.mix index {index} out of range for size {self.size}.")
        name, j = self.pick(index)
        sample = self.children[name][j]
        missing = [k for k in (*VIDEO_KEYS, *PROMPT_KEYS) if k not in sample]
        if missing:
            raise LayerkitError(f"layerflow.mix dataset '{name}' gives samples without {missing}.")
        out = {k: sample[k] for k in (*VIDEO_KEYS, *PROMPT_KEYS)}
        for key, channels in (("foreground_rgb", 3), ("foreground_alpha", 1), ("background", 3), ("blended", 3)):
            want = (self.num_frames, channels, self.height, self.width)
            if tuple(out[key].shape) != want:
                raise LayerkitError(f"layerflow.mix dataset '{name}' gives {key} of shape {tuple(out[key].shape)}; "
                                    f"this mix needs {want} (num_frames, channels, height, width).")
        out["is_static"] = bool(sample.get("is_static", False))
        out["source"] = str(sample.get("source", f"{name}[{j}]"))
        out["dataset"] = name
        return out
