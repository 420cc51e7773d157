"""Read and write videos (RGB or RGBA) with PyAV, plus PNG sequences and images.

Frames are arrays shaped ``[F, H, W, C]`` with ``C = 3`` (RGB) or ``C = 4`` (RGBA): ``uint8``
from 8-bit sources, ``uint16`` from deeper ones (16-bit PNGs, 10- to 16-bit video such as ProRes
4444), whose depth is kept, never clipped or silently cut to 8 bits; :func:`unit_float` turns
either into floats in [0, 1], and ``read_video(..., bits=8)`` asks for 8 bits explicitly (scaled,
``round(v * 255 / 65535)``) where a consumer works on bytes. Writes are atomic: a hidden sibling is written first and renamed onto the
target, so a failed write never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from layerkit.errors import LayerkitError, expect_shape

DEFAULT_FPS = 8.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RGBA_FORMATS = ("mov", "webm", "png")


@dataclass
class Video:
    """Decoded frames ``[F, H, W, C]`` (C = 3 RGB or 4 RGBA; ``uint8``, or ``uint16`` from a source
    deeper than 8 bits) and their frame rate."""

    frames: np.ndarray
    fps: float

    @property
    def has_alpha(self) -> bool:
        return self.frames.shape[-1] == 4

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class _Codec:
    name: str
    pix_fmt: str
    options: dict[str, str]
    alpha: bool  # encodes an alpha plane
    even: bool  # needs even width/height


_CODECS = {
    ".mp4": _Codec("libx264", "yuv420p", {"crf": "18", "preset": "medium"}, False, True),
    ".mov": _Codec("prores_ks", "yuva444p10le", {"profile": "4444"}, True, False),
    ".webm": _Codec(
        "libvpx-vp9", "yuva420p", {"crf": "20", "b": "0", "deadline": "good", "cpu-used": "4"}, True, False
    ),
}
# Native ffmpeg vp8/vp9 decoders drop the alpha plane stored in WebM side data.
_ALPHA_DECODERS = {"vp8": "libvpx", "vp9": "libvpx-vp9"}


# ----------------------------------------------------------------------------- reading


def read_video(path: str | os.PathLike, *, max_frames: int | None = None, allow_gaps: bool = False,
               bits: int | None = None) -> Video:
    """Read a video file, a directory of PNGs or one image into ``Video`` (``[F, H, W, 3|4]``).

    A directory's PNGs are its frames in the order of their numbers (``frame_0001.png``, ...);
    a sequence whose numbers skip one is refused unless ``allow_gaps`` (then its frames are
    used as if consecutive). ``bits``: None keeps the source's depth (``uint8``, or ``uint16``
    from a deeper source); 8 or 16 converts to that depth.
    """
    if bits not in (None, 8, 16):
        raise LayerkitError(f"bits must be 8, 16 or None (the source's depth), got {bits!r}.")
    video = _read_video(Path(path), max_frames, allow_gaps)
    if bits is not None:
        video.frames = to_depth(video.frames, bits)
    return video


def to_depth(frames: np.ndarray, bits: int) -> np.ndarray:
    """``uint8`` or ``uint16`` frames at ``bits`` = 8 or 16 (rounded, full range to full range)."""
    if bits == 16:
        return frames if frames.dtype == np.uint16 else frames.astype(np.uint16) * 257
    if frames.dtype == np.uint8:
        return frames
    return ((frames.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def unit_float(frames: np.ndarray) -> np.ndarray:
    """``uint8`` or ``uint16`` frames as ``float32`` in [0, 1], each at its own full range."""
    if frames.dtype not in (np.uint8, np.uint16):
        raise LayerkitError(f"frames have dtype {frames.dtype}; expected uint8 or uint16.")
    return frames.astype(np.float32) / float(np.iinfo(frames.dtype).max)


def read_image(path: str | os.PathLike, *, name: str = "image") -> np.ndarray:
    """One image as ``[H, W, 3|4]`` (``uint8``, or ``uint16`` from a 16-bit PNG); ``name`` says
    what it is in the errors (e.g. ``inputs.image``)."""
    path = Path(path)
    if path.is_dir():
        raise LayerkitError(f"{name} '{path}' is a folder, not an image file.")
    if not path.is_file():
        raise LayerkitError(f"{name} '{path}' does not exist.")
    return read_images([path], path, name=name)[0]


def _read_video(path: Path, max_frames: int | None, allow_gaps: bool) -> Video:
    if max_frames is not None and max_frames < 1:
        raise LayerkitError(f"max_frames must be a positive integer, got {max_frames}.")
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LayerkitError(f"video file '{path}' is a symlink loop.") from None
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise LayerkitError(f"video file '{path}' cannot be read ({exc.strerror or exc}).") from None
        if path.is_symlink():
            raise LayerkitError(f"video file '{path}' is a broken symlink (to '{os.readlink(path)}').") from None
        raise LayerkitError(f"video file '{path}' does not exist.") from None
    if path.is_dir():
        files = png_sequence(path, allow_gaps=allow_gaps, max_frames=max_frames)
        return Video(read_images(files, path), DEFAULT_FPS)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Video(read_images([path], path), DEFAULT_FPS)
    return _read_av(path, max_frames)


_NUMBERED = re.compile(r"(.*?)(\d+)")


def png_sequence(directory: str | os.PathLike, *, allow_gaps: bool = False, max_frames: int | None = None) -> list[Path]:
    """The ``.png`` files of ``directory`` as frames, at most ``max_frames`` of them.

    Names that share one prefix and end in a number (``frame_0001.png``) are ordered by that
    number, and the frames read must be numbered consecutively unless ``allow_gaps``; any other
    names are ordered by name.
    """
    directory = Path(directory)
    files = [p for p in directory.iterdir() if p.suffix.lower() == ".png" and p.is_file()]
    if not files:
        raise LayerkitError(f"PNG sequence directory '{directory}' contains no .png files.")
    matches = [_NUMBERED.fullmatch(p.stem) for p in files]
    if not all(matches) or len({m.group(1) for m in matches if m}) != 1:
        return sorted(files)[:max_frames]
    numbered = sorted(((int(m.group(2)), p) for m, p in zip(matches, files) if m), key=lambda t: (t[0], t[1].name))
    numbered = numbered[:max_frames]
    if not allow_gaps:
        for (a, first), (b, second) in zip(numbered, numbered[1:]):
            if b > a + 1:
                missing = f"frame {a + 1} is" if b == a + 2 else f"frames {a + 1} to {b - 1} are"
                raise LayerkitError(
                    f"PNG sequence '{directory}' has a gap: {missing} missing between '{first.name}' and "
                    f"'{second.name}'; fill it, or pass allow_gaps=True to use the frames as if consecutive."
                )
    return [p for _, p in numbered]


_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _png_bit_depth(file: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, None when ``file`` is not a PNG."""
    with open(file, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _png16_colour(file: Path, colour_type: int) -> np.ndarray:
    """uint16 ``[H, W, 3|4]`` of a 16-bit colour or grey+alpha PNG (Pillow reads these as 8 bits),
    decoded by ffmpeg's PNG decoder."""
    try:
        with av.open(str(file)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration) as exc:
        raise LayerkitError(f"could not read image '{file}': {exc}.") from None
    return frame.to_ndarray(format="rgb48le" if colour_type == 2 else "rgba64le")


def _image_array(im: Image.Image, file: Path) -> np.ndarray:
    """``[H, W, 3|4]`` of a loaded image: uint8, or uint16 from a 16-bit PNG, whose depth is kept
    (Pillow's own conversion clips 16-bit grey to white and cuts 16-bit colour to 8 bits); a
    16-bit grey's tRNS level is made transparent."""
    depth = _png_bit_depth(file) if im.format == "PNG" else None
    if depth is not None and depth[0] == 16 and depth[1] in (2, 4, 6):
        return _png16_colour(file, depth[1])
    if im.mode in _WIDE_GREY:
        wide = np.asarray(im).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise LayerkitError(f"image '{file}' has {im.mode} pixels outside 0..65535; only 8- and 16-bit images are read.")
        rgb = np.repeat(wide.astype(np.uint16)[..., None], 3, axis=-1)
        level = im.info.get("transparency")
        if isinstance(level, int):
            return np.dstack([rgb, np.where(wide == level, 0, 65535).astype(np.uint16)])
        return rgb
    if im.mode in ("F", "I;32", "I;32L", "I;32B") or im.mode.startswith("I;16"):
        raise LayerkitError(f"image '{file}' has {im.mode} pixels; only 8- and 16-bit integer images are read.")
    alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    return np.asarray(im.convert("RGBA" if alpha else "RGB"))


def read_images(files: list[Path], source: Path, *, name: str = "image") -> np.ndarray:
    """Image files as one clip ``[F, H, W, 3|4]``: RGBA when any frame has alpha; uint8, or
    uint16 when any frame is 16-bit (8-bit frames then scaled up exactly, ``v * 257``)."""
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                im.load()
                images.append(_image_array(im, Path(file)))
        except (OSError, ValueError, SyntaxError) as exc:
            raise LayerkitError(f"could not read {name} '{file}': {exc}.") from None
    if len({im.shape[:2] for im in images}) > 1:
        raise LayerkitError(f"PNG sequence '{source}' mixes frames of different sizes.")
    if any(im.dtype == np.uint16 for im in images):
        images = [to_depth(im, 16) for im in images]
    if any(im.shape[-1] == 4 for im in images):  # one RGBA frame makes the sequence RGBA
        opaque = np.iinfo(images[0].dtype).max
        images = [
            im if im.shape[-1] == 4 else np.dstack([im, np.full(im.shape[:2], opaque, im.dtype)])
            for im in images
        ]
    return np.stack(images)


def _read_av(path: Path, max_frames: int | None) -> Video:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise LayerkitError(f"could not decode '{path}': it has no video stream.")
            stream = container.streams.video[0]
            decoder = stream.codec_context
            alpha_mode = {k.lower(): v for k, v in stream.metadata.items()}.get("alpha_mode")
            if alpha_mode == "1" and decoder.name in _ALPHA_DECODERS:
                decoder = av.CodecContext.create(_ALPHA_DECODERS[decoder.name], "r")
            frames = list(_decode(container, stream, decoder, max_frames))
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    except av.FFmpegError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise LayerkitError(f"could not decode '{path}': it is not a readable video ({reason}).") from None
    if not frames:
        raise LayerkitError(f"could not decode '{path}': it contains no video frames.")
    fmt = frames[0].format
    alpha = fmt.has_palette or any(c.is_alpha for c in fmt.components)
    deep = not fmt.has_palette and max(c.bits for c in fmt.components) > 8  # e.g. ProRes 4444: 10 bits
    target = ("rgba64le" if alpha else "rgb48le") if deep else ("rgba" if alpha else "rgb24")
    array = np.stack([f.to_ndarray(format=target) for f in frames])
    # GIF and palette decoders always report an alpha format; drop alpha when it is all opaque.
    if alpha and (fmt.has_palette or decoder.name == "gif") and array[..., 3].min() == 255:
        array = np.ascontiguousarray(array[..., :3])
    fps = float(rate) if rate and math.isfinite(float(rate)) and rate > 0 else DEFAULT_FPS
    return Video(array, fps)


def _decode(container, stream, decoder, max_frames: int | None) -> Iterator[av.VideoFrame]:
    count = 0
    for packet in container.demux(stream):
        for frame in decoder.decode(packet):
            yield frame
            count += 1
            if max_frames is not None and count >= max_frames:
                return


# ----------------------------------------------------------------------------- writing


def as_uint8_frames(frames, name: str = "frames", channels: tuple[int, ...] = (3, 4)) -> np.ndarray:
    """Convert uint8, uint16 or float-in-[0,1] arrays or torch tensors ``[F, H, W, C]`` to uint8 numpy."""
    if hasattr(frames, "detach"):  # torch tensor, without importing torch
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3 and 1 in channels:
        frames = frames[..., None]
    ok = frames.ndim == 4 and frames.shape[-1] in channels and min(frames.shape) > 0
    expect_shape(name, frames, f"[F, H, W, C] with C in {channels} and no empty axis", ok)
    if frames.dtype in (np.uint8, np.uint16):
        return to_depth(frames, 8)
    if frames.dtype == np.bool_ or np.issubdtype(frames.dtype, np.floating):
        return (np.clip(np.nan_to_num(frames.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise LayerkitError(f"{name} have dtype {frames.dtype}, expected uint8 or float values in [0, 1].")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool, is_dir: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling path to write into; rename it onto ``path`` only on success."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise LayerkitError(f"output '{path}' already exists; pass overwrite=True to replace it.")
        if path.is_dir() != is_dir:
            kind = "a directory" if path.is_dir() else "a file"
            raise LayerkitError(f"output '{path}' is {kind}; refusing to replace it with a different kind.")
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[: len(path.name) - len(path.suffix)] if path.suffix else path.name
    tmp = path.with_name(f".{stem}.{os.getpid()}.partial{path.suffix}")
    _remove(tmp)
    try:
        if is_dir:
            tmp.mkdir()
        yield tmp
        if is_dir and path.is_dir():  # os.replace cannot overwrite a non-empty directory
            old = path.with_name(f".{stem}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_video(
    path: str | os.PathLike, frames, fps: float = DEFAULT_FPS, *, overwrite: bool = False
) -> Path:
    """Write ``[F, H, W, 3|4]`` frames; the suffix picks the format.

    ``.mp4`` H.264 (alpha dropped), ``.mov`` ProRes 4444 with alpha, ``.webm`` VP9 with
    alpha, ``.gif``, ``.png`` (a single frame), no suffix: a directory of ``frame_00000.png``.
    """
    path = Path(path)
    frames = as_uint8_frames(frames)
    suffix = path.suffix.lower()
    if suffix not in (*_CODECS, ".gif", ".png", ""):
        raise LayerkitError(
            f"cannot write '{path}': unsupported suffix, expected .mp4, .mov, .webm, .gif, .png or none (PNG directory)."
        )
    if suffix == ".png" and len(frames) != 1:
        raise LayerkitError(
            f"cannot write {len(frames)} frames to the single image '{path}'; use a directory path without suffix for a PNG sequence."
        )
    return _write(path, frames, fps, suffix or "dir", overwrite)


def _write(path: Path, frames: np.ndarray, fps: float, kind: str, overwrite: bool) -> Path:
    """Write uint8 frames as ``kind``: a codec suffix, ``.gif``, ``.png`` or ``dir`` (PNG sequence)."""
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise LayerkitError(f"fps must be a positive number, got {fps!r}.")
    fps = float(fps)
    with atomic_output(path, overwrite=overwrite, is_dir=kind == "dir") as tmp:
        if kind == "dir":
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(tmp / f"frame_{i:05d}.png")
        elif kind == ".png":
            Image.fromarray(frames[0]).save(tmp, format="PNG")
        elif kind == ".gif":
            images = [Image.fromarray(f) for f in frames]
            gif = {"duration": round(1000 / fps), "loop": 0, "disposal": 2}
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], **gif)
        else:
            try:
                _encode_av(tmp, frames, fps, _CODECS[kind])
            except av.FFmpegError as exc:
                raise LayerkitError(
                    f"could not encode '{path}' with {_CODECS[kind].name}: {exc.strerror or exc}."
                ) from None
    return path


def _encode_av(path: Path, frames: np.ndarray, fps: float, codec: _Codec) -> None:
    if not codec.alpha:
        frames = frames[..., :3]
    elif frames.shape[-1] == 3:  # opaque alpha for RGB input
        frames = np.concatenate([frames, np.full(frames.shape[:-1] + (1,), 255, np.uint8)], axis=-1)
    if codec.even:  # yuv420p needs even sizes: replicate the last row/column
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec.name, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = codec.pix_fmt
        stream.options = dict(codec.options)
        fmt = "rgba" if frames.shape[-1] == 4 else "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=fmt)))
        container.mux(stream.encode(None))


def write_layers(
    out_dir: str | os.PathLike,
    layers: dict[str, np.ndarray],
    fps: float = DEFAULT_FPS,
    *,
    rgba_format: str = "mov",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write each layer ``[F, H, W, 1|3|4]``: RGB/grey as ``<name>.mp4``, RGBA as ``<name>.<rgba_format>``.

    ``rgba_format`` is ``mov`` (ProRes 4444), ``webm`` (VP9) or ``png`` (directory ``<name>_png``).
    """
    if rgba_format not in RGBA_FORMATS:
        raise LayerkitError(f"rgba_format must be one of {', '.join(RGBA_FORMATS)}, got {rgba_format!r}.")
    arrays: dict[str, np.ndarray] = {}
    for name, frames in layers.items():  # validate everything before writing anything
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise LayerkitError(f"layer name {name!r} is not a plain file name.")
        array = as_uint8_frames(frames, f"layer '{name}'", channels=(1, 3, 4))
        arrays[name] = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array
    written: dict[str, Path] = {}
    for name, array in arrays.items():
        kind = ".mp4" if array.shape[-1] == 3 else ("dir" if rgba_format == "png" else f".{rgba_format}")
        target = Path(out_dir) / (f"{name}_png" if kind == "dir" else f"{name}{kind}")
        written[name] = _write(target, array, fps, kind, overwrite)
    return written


# ----------------------------------------------------------------------------- fitting user inputs

FIT_MODES = ("crop", "pad", "stretch")


def fit_frames(frames, height: int, width: int, fit: str = "crop", *, name: str = "video"):
    """Frames ``[F, C, H, W]`` (float, [0, 1]) -> ``[F, C, height, width]`` and a note saying what
    was done (None when the size already matched).

    ``crop``: scale to cover, centre crop (aspect ratio kept); ``pad``: scale to fit, pad the
    borders with zeros (transparent for RGBA, black for RGB); ``stretch``: resize to the size.
    """
    import torch.nn.functional as F

    if fit not in FIT_MODES:
        raise LayerkitError(f"inputs.fit is '{fit}'; expected one of {', '.join(FIT_MODES)}.")
    h, w = int(frames.shape[-2]), int(frames.shape[-1])
    if (h, w) == (height, width):
        return frames, None
    if fit == "stretch":
        out = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return out.clamp(0, 1), f"{name}: {w}x{h} stretched to {width}x{height}"
    scale = max(height / h, width / w) if fit == "crop" else min(height / h, width / w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    out = F.interpolate(frames, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    if fit == "crop":
        top, left = (sh - height) // 2, (sw - width) // 2
        out = out[..., top : top + height, left : left + width]
        return out, f"{name}: {w}x{h} scaled to {sw}x{sh} and centre-cropped to {width}x{height}"
    top, left = (height - sh) // 2, (width - sw) // 2
    out = F.pad(out, (left, width - sw - left, top, height - sh - top))
    return out, f"{name}: {w}x{h} scaled to {sw}x{sh} and padded to {width}x{height}"
