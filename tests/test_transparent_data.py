"""``transparent.rgba_folder``: RGBA clips (.mov ProRes 4444, .webm VP9 alpha, PNG folders)
with captions, frames scaled/cropped/strided, one-sentence errors, and 2 training steps."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from layerkit_plugins.transparent.data import RGBAFolder

from layerkit.errors import LayerkitError
from layerkit.io.video import write_video

F, H, W = 8, 40, 48  # source clips: 8 frames of 40x48


def clip(frames: int = F, height: int = H, width: int = W) -> np.ndarray:
    """uint8 [F, H, W, 4]: frame i has red 20*i + 30, a transparent left half and an opaque right half."""
    out = np.zeros((frames, height, width, 4), np.uint8)
    for i in range(frames):
        out[i, ..., 0] = 20 * i + 30
        out[i, ..., 1] = 60
        out[i, ..., 2] = 200
    out[..., : width // 2, 3] = 0
    out[..., width // 2 :, 3] = 255
    return out


def write_rgb_prores(path, frames: np.ndarray) -> None:
    """A ProRes 422 .mov: no alpha plane."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("prores_ks", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv422p10le"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[..., :3]), format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    write_video(root / "alpha.mov", clip())
    (root / "alpha.txt").write_text("a red circle\nmoving right\n")
    write_video(root / "beta.webm", clip())
    write_video(root / "gamma", clip())  # a folder of PNG frames
    (root / "captions.json").write_text(json.dumps({"beta.webm": "a blue square", "gamma": "a green star"}))
    (root / "notes.md").write_text("ignored")
    return root


def test_reads_every_kind_with_captions_stride_and_resize(folder):
    data = RGBAFolder(root=str(folder), num_frames=4, height=32, width=32, stride=2, clip_start="first")
    assert len(data) == 3
    assert [item.caption for item in data.items] == ["a red circle moving right", "a blue square", "a green star"]
    assert [item.frames for item in data.items] == [F, F, F]
    for index in range(3):
        sample = data[index]
        rgba = sample["rgba"]
        assert rgba.shape == (4, 4, 32, 32) and rgba.dtype == torch.float32
        assert rgba.min() >= 0 and rgba.max() <= 1
        # frames 0, 2, 4, 6 (stride 2): red encodes the source frame index
        red = rgba[:, 0, :, -4:].mean(dim=(1, 2)) * 255
        assert torch.allclose(red, torch.tensor([30.0, 70.0, 110.0, 150.0]), atol=4), (index, red)
        # 40x48 scaled to cover 32x32 (-> 32x38) and centre-cropped: alpha still splits left/right
        alpha = rgba[:, 3]
        assert alpha[:, :, :10].max() < 0.02 and alpha[:, :, -10:].min() > 0.98
        assert sample["meta"]["start"] == 0 and sample["meta"]["stride"] == 2
    assert data[0]["prompt"] == "a red circle moving right"


def test_random_start_and_crop_stay_inside_the_clip(folder):
    torch.manual_seed(0)
    data = RGBAFolder(root=str(folder), num_frames=3, height=16, width=16, stride=2, crop="random")
    starts = {data[0]["meta"]["start"] for _ in range(12)}
    assert starts <= {0, 1, 2, 3} and len(starts) > 1  # 8 frames, span 5


def test_scaling_is_premultiplied_so_hidden_colour_does_not_bleed():
    frames = np.zeros((2, 32, 32, 4), np.uint8)
    frames[..., 1] = 255  # bright green everywhere, but only where alpha = 0 ...
    frames[:, 8:24, 8:24] = (255, 0, 0, 255)  # ... around an opaque red square
    data = RGBAFolder.__new__(RGBAFolder)
    data.height, data.width, data.crop = 8, 8, "center"
    out = data._resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    visible = out[:, 3] > 0.05
    assert visible.any() and (out[:, 3] < 0.95).any()  # soft edges exist
    assert out[:, 1][visible].max() < 0.02  # and carry no green


def test_errors_name_the_file_and_say_what_to_do(tmp_path):
    def folder(name: str):
        root = tmp_path / name
        root.mkdir()
        return root

    root = folder("no_alpha")
    write_rgb_prores(root / "flat.mov", clip())
    (root / "flat.txt").write_text("x")
    with pytest.raises(LayerkitError, match=r"'flat.mov' in .* has no alpha channel"):
        RGBAFolder(root=str(root), num_frames=4)

    root = folder("rgb_pngs")
    write_video(root / "seq", clip()[..., :3])
    (root / "seq.txt").write_text("x")
    with pytest.raises(LayerkitError, match="'seq' .* no alpha channel"):
        RGBAFolder(root=str(root), num_frames=4)

    root = folder("no_caption")
    write_video(root / "a.mov", clip())
    write_video(root / "b.webm", clip())
    (root / "a.txt").write_text("fine")
    with pytest.raises(LayerkitError, match=r"no caption for 'b.webm'.*captions.json"):
        RGBAFolder(root=str(root), num_frames=4)

    root = folder("corrupt")
    write_video(root / "good.mov", clip())
    (root / "bad.mov").write_bytes(b"\x00\x01not a movie" * 64)
    (root / "captions.json").write_text(json.dumps({"good": "x", "bad": "y"}))
    with pytest.raises(LayerkitError, match=r"'bad.mov' in .* could not be read \(corrupt"):
        RGBAFolder(root=str(root), num_frames=4)

    root = folder("mp4")
    write_video(root / "c.mp4", clip()[..., :3])
    with pytest.raises(LayerkitError, match="'c.mp4' .* cannot hold an alpha channel"):
        RGBAFolder(root=str(root))

    root = folder("short")
    write_video(root / "tiny.mov", clip(frames=3))
    (root / "tiny.txt").write_text("x")
    with pytest.raises(LayerkitError, match=r"'tiny.mov \(3 frames\)'.*shorter than one clip of 4 frames every 1"):
        RGBAFolder(root=str(root), num_frames=4)

    with pytest.raises(LayerkitError, match="holds no RGBA clips"):
        RGBAFolder(root=str(folder("empty")))
    with pytest.raises(LayerkitError, match="data.root"):
        RGBAFolder(root=None)
    bad_json = folder("bad_json")
    (bad_json / "captions.json").write_text("{nope")
    with pytest.raises(LayerkitError, match="not valid JSON"):
        RGBAFolder(root=str(bad_json))


def test_a_corrupt_file_found_while_reading_is_named(folder):
    data = RGBAFolder(root=str(folder), num_frames=4, height=32, width=32, probe=False)
    (folder / "alpha.mov").write_bytes(b"garbage" * 100)
    with pytest.raises(LayerkitError, match="alpha.mov"):
        data[0]


def test_stage2_trains_two_steps_on_a_folder_of_rgba_videos(folder, tmp_path):
    from safetensors import safe_open

    from layerkit.training.run import train

    out = train(["+experiment=transparent_stage2", "backbone=animatediff_tiny", "data=transparent_rgba_folder",
                 f"data.root={folder}", "data.num_frames=4", "data.height=32", "data.width=32", "data.stride=2",
                 "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    record = json.loads((out / "record.json").read_text())
    assert record["global_step"] == 2
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("adapters.inter_frame.layers.") for k in keys)


def test_opaque_sprite_clips_are_the_scene_with_alpha_one():
    """data.opaque=true: the RGB base's clips (the toy's AnimateDiff learns ordinary video)."""
    from layerkit_plugins.transparent.data import RGBASpriteClips

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

    config = {"num_frames": 4, "height": 16, "width": 16}
    opaque, sprite = RGBASpriteClips(2, opaque=True, **config)[1], RGBASpriteClips(2, **config)[1]
    scene = make_sample(seed_for("train", 0, 1), ShapesConfig(num_sprites=1, **config))
    assert (opaque["rgba"][:, 3] == 1).all() and torch.equal(opaque["rgba"][:, :3], scene["blended"])
    assert opaque["prompt"] == sprite["prompt"] and opaque["meta"] == sprite["meta"]
    assert sprite["rgba"][:, 3].min() == 0
