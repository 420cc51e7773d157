"""Round trips through real encoders/decoders (PyAV) for layerkit.io.video and preview."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from layerkit.errors import LayerkitError, ShapeError
from layerkit.io import video as video_mod
from layerkit.io.preview import LABEL_H, PAD, checkerboard, composite_over_checkerboard, write_preview_sheet
from layerkit.io.video import Video, read_video, write_layers, write_video

F, H, W = 8, 48, 64


def smooth_rgb(f: int = F, h: int = H, w: int = W) -> np.ndarray:
    """Smooth gradients that change per frame, uint8 [F, H, W, 3]."""
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    r = 128 + 100 * np.sin(x / w * 3 + t * 0.3)
    g = 128 + 100 * np.cos(y / h * 3 - t * 0.2)
    b = 60 + 2.0 * x + 1.0 * y
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def disc_alpha(f: int = F, h: int = H, w: int = W) -> np.ndarray:
    """A soft disc moving left to right, transparent (0) corners, uint8 [F, H, W]."""
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    dist = np.sqrt((x - (w * 0.35 + 2 * t)) ** 2 + (y - h / 2) ** 2)
    return np.clip((h * 0.35 - dist) * 40, 0, 255).astype(np.uint8)


def rgba_frames() -> np.ndarray:
    return np.concatenate([smooth_rgb(), disc_alpha()[..., None]], axis=-1)


def check_alpha(got: np.ndarray, want: np.ndarray, tol_max: float, tol_mean: float) -> None:
    err = np.abs(got.astype(int) - want.astype(int))
    assert err.max() <= tol_max and err.mean() <= tol_mean, (err.max(), err.mean())
    assert (got[:, 0, 0] <= 2).all() and (got[:, -1, -1] <= 2).all()  # transparent corners
    for i in range(len(got)):  # opaque disc centre where it was drawn
        assert got[i, H // 2, int(W * 0.35 + 2 * i)] >= 250


def test_rgb_mp4_round_trip(tmp_path):
    frames = smooth_rgb()
    out = write_video(tmp_path / "rgb.mp4", frames, fps=12)
    video = read_video(out)
    assert isinstance(video, Video) and video.frames.shape == (F, H, W, 3) and video.frames.dtype == np.uint8
    assert not video.has_alpha and video.num_frames == F and video.fps == pytest.approx(12)
    assert np.abs(video.frames.astype(int) - frames).mean() < 6
    assert read_video(out, max_frames=3).num_frames == 3


def test_mp4_drops_alpha_and_pads_odd_sizes(tmp_path):
    frames = np.concatenate([smooth_rgb(4, 47, 63), np.full((4, 47, 63, 1), 9, np.uint8)], axis=-1)
    video = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert video.frames.shape == (4, 48, 64, 3)
    assert np.abs(video.frames[:, :47, :63].astype(int) - frames[..., :3]).mean() < 6


def test_float_and_torch_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    frames = smooth_rgb(2, 16, 16)
    as_float = frames.astype(np.float32) / 255
    write_video(tmp_path / "f", as_float)
    write_video(tmp_path / "t", torch.from_numpy(as_float))
    assert np.array_equal(read_video(tmp_path / "f").frames, frames)
    assert np.array_equal(read_video(tmp_path / "t").frames, frames)


def test_prores_4444_mov_keeps_alpha(tmp_path):
    frames = rgba_frames()
    video = read_video(write_video(tmp_path / "a.mov", frames, fps=8), bits=8)
    assert video.frames.shape == (F, H, W, 4) and video.has_alpha and video.fps == pytest.approx(8)
    check_alpha(video.frames[..., 3], frames[..., 3], tol_max=2, tol_mean=1)
    assert np.abs(video.frames[..., :3].astype(int) - frames[..., :3]).mean() < 3


def test_prores_rgb_input_gets_opaque_alpha(tmp_path):
    video = read_video(write_video(tmp_path / "rgb.mov", smooth_rgb(2)), bits=8)
    assert video.has_alpha and (video.frames[..., 3] >= 254).all()


def test_webm_vp9_keeps_alpha(tmp_path):
    frames = rgba_frames()
    path = write_video(tmp_path / "a.webm", frames, fps=8)
    video = read_video(path)
    assert video.frames.shape == (F, H, W, 4)
    check_alpha(video.frames[..., 3], frames[..., 3], tol_max=16, tol_mean=2)
    assert video.frames[..., 3].std() > 50  # alpha really varies
    # ffmpeg's native vp9 decoder would lose alpha; read_video must not behave like it.
    with av.open(str(path)) as container:
        native = next(container.decode(video=0))
    assert native.format.name == "yuv420p"


def test_png_sequence_is_exact(tmp_path):
    frames = rgba_frames()
    out = write_video(tmp_path / "seq", frames)
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:05d}.png" for i in range(F)]
    video = read_video(out)
    assert np.array_equal(video.frames, frames)
    check_alpha(video.frames[..., 3], frames[..., 3], tol_max=0, tol_mean=0)
    assert read_video(out, max_frames=2).num_frames == 2


def test_gif_read(tmp_path):
    frames = smooth_rgb(4, 32, 32)
    images = [Image.fromarray(f).quantize(64) for f in frames]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    video = read_video(tmp_path / "a.gif")
    assert video.frames.shape == (4, 32, 32, 3)  # fully opaque gif: no alpha channel
    assert np.abs(video.frames.astype(int) - frames).mean() < 10
    rgba = rgba_frames()[:4]
    back = read_video(write_video(tmp_path / "b.gif", rgba))
    assert back.frames.shape == (4, H, W, 4)
    assert back.frames[0, 0, 0, 3] == 0 and back.frames[0, H // 2, int(W * 0.35), 3] == 255


def test_single_image_is_one_frame(tmp_path):
    Image.fromarray(smooth_rgb(1)[0]).save(tmp_path / "img.png")
    video = read_video(tmp_path / "img.png")
    assert video.frames.shape == (1, H, W, 3) and np.array_equal(video.frames[0], smooth_rgb(1)[0])
    write_video(tmp_path / "one.png", rgba_frames()[:1])
    assert read_video(tmp_path / "one.png").frames.shape == (1, H, W, 4)


def test_missing_and_corrupt_inputs(tmp_path):
    with pytest.raises(LayerkitError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "x.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LayerkitError, match="x.mp4") as info:
        read_video(bad)
    assert not isinstance(info.value, av.FFmpegError)
    good = write_video(tmp_path / "good.webm", rgba_frames())
    (tmp_path / "cut.webm").write_bytes(good.read_bytes()[:200])
    with pytest.raises(LayerkitError, match="cut.webm"):
        read_video(tmp_path / "cut.webm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerkitError, match="no .png files"):
        read_video(tmp_path / "empty")


def test_bad_shapes_and_arguments(tmp_path):
    with pytest.raises(ShapeError, match=r"\(48, 64, 3\)"):
        write_video(tmp_path / "a.mp4", smooth_rgb()[0])
    with pytest.raises(ShapeError):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(LayerkitError, match="unsupported suffix"):
        write_video(tmp_path / "a.xyz", smooth_rgb(1))
    with pytest.raises(LayerkitError, match="fps"):
        write_video(tmp_path / "a.mp4", smooth_rgb(1), fps=0)
    with pytest.raises(LayerkitError, match="dtype"):
        write_video(tmp_path / "a.mp4", smooth_rgb(1).astype(np.int64))
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "a.mp4"
    target.write_bytes(b"keep me")
    with pytest.raises(LayerkitError, match="already exists; pass overwrite=True"):
        write_video(target, smooth_rgb(2))
    assert target.read_bytes() == b"keep me"
    write_video(target, smooth_rgb(2), overwrite=True)
    assert read_video(target).num_frames == 2
    seq = write_video(tmp_path / "seq", smooth_rgb(3))
    write_video(seq, smooth_rgb(2), overwrite=True)
    assert read_video(seq).num_frames == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "seq"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def explode(path, *args):
        path.write_bytes(b"half")
        raise RuntimeError("encoder blew up")

    monkeypatch.setattr(video_mod, "_encode_av", explode)
    with pytest.raises(RuntimeError, match="blew up"):
        write_video(tmp_path / "a.mp4", smooth_rgb(2))

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(video_mod.Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "seq", smooth_rgb(2))
    assert list(tmp_path.iterdir()) == []


def test_write_layers(tmp_path):
    layers = {"background": smooth_rgb(), "fg": rgba_frames(), "mask": disc_alpha()}
    paths = write_layers(tmp_path / "out", layers, fps=8, rgba_format="webm")
    assert {k: p.name for k, p in paths.items()} == {
        "background": "background.mp4",
        "fg": "fg.webm",
        "mask": "mask.mp4",
    }
    assert read_video(paths["fg"]).has_alpha and not read_video(paths["mask"]).has_alpha
    png = write_layers(tmp_path / "out", {"fg": rgba_frames()}, fps=8, rgba_format="png")
    assert png["fg"].is_dir() and read_video(png["fg"]).has_alpha
    with pytest.raises(LayerkitError, match="rgba_format"):
        write_layers(tmp_path / "out", layers, fps=8, rgba_format="avi")


def test_checkerboard_and_composite():
    board = checkerboard(16, 24, cell=8)
    assert board.shape == (16, 24, 3) and board[0, 0, 0] > board[0, 8, 0] and board[8, 8, 0] == board[0, 0, 0]
    frames = rgba_frames()
    comp = composite_over_checkerboard(frames)
    assert comp.shape == (F, H, W, 3)
    assert np.array_equal(comp[:, 0, 0], np.broadcast_to(board[0, 0], (F, 3)))
    i = 0
    centre = (H // 2, int(W * 0.35))
    assert np.array_equal(comp[i, centre[0], centre[1]], frames[i, centre[0], centre[1], :3])
    with pytest.raises(ShapeError):
        composite_over_checkerboard(smooth_rgb())


def test_preview_sheet(tmp_path):
    layers = {"background": smooth_rgb(), "fg": rgba_frames(), "mask": disc_alpha()}
    out = write_preview_sheet(tmp_path / "sheet.png", layers, max_frames=4)
    with Image.open(out) as im:
        sheet = np.asarray(im.convert("RGB"))
    assert sheet.shape == (PAD + 3 * (LABEL_H + H + PAD), PAD + 4 * (W + PAD), 3)
    # row 1 (fg), first column: its transparent top-left corner shows the checkerboard
    top, left = PAD + 1 * (LABEL_H + H + PAD) + LABEL_H, PAD
    cell = sheet[top : top + H, left : left + W]
    board = checkerboard(H, W)
    assert np.array_equal(cell[:6, :6], board[:6, :6])
    with pytest.raises(LayerkitError, match="already exists"):
        write_preview_sheet(out, layers)
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]
