"""LayerFlow data from files: layered folders, multi-layer images, copy-paste, the weighted mix,
and a two-step stage-3 run on them (docs/layerflow_data.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from layerkit.errors import LayerkitError
from layerkit.io.video import write_video

F, H, W = 8, 32, 32


def frames(seed: int, n: int = F, h: int = H, w: int = W, channels: int = 3) -> np.ndarray:
    """uint8 [n, h, w, channels]; pixel (0, 0) of frame i holds 10 * i in every channel (frame tag)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(30, 226, size=(n, h, w, channels), dtype=np.uint8)
    out[:, 0, 0, :] = (np.arange(n, dtype=np.uint8) * 10)[:, None]
    return out


def matte(n: int = F, h: int = H, w: int = W) -> np.ndarray:
    """A soft disc moving right: uint8 [n, h, w]."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.clip(1.5 - np.hypot(yy - h / 2, xx - 8 - i) / 5, 0, 1) for i in range(n)]
    return (np.stack(out) * 255).round().astype(np.uint8)


def write_prompts(folder: Path, **prompts: str) -> None:
    (folder / "prompts.json").write_text(json.dumps(prompts))


def rgba_sample(root: Path, name: str, seed: int, n: int = F, suffix: str = "", h: int = H, w: int = W) -> Path:
    """foreground as one RGBA file (``suffix`` .mov/.webm, or '' for a PNG directory) + background."""
    folder = root / name
    folder.mkdir(parents=True)
    fg = np.concatenate([frames(seed, n, h, w), matte(n, h, w)[..., None]], axis=-1)
    write_video(folder / f"foreground{suffix}", fg)
    write_video(folder / "background", frames(seed + 100, n, h, w))
    write_prompts(folder, foreground=f"a red circle {seed}", background=f"blue stripes {seed}")
    return folder


def split_sample(root: Path, name: str, seed: int, n: int = F) -> Path:
    """foreground RGB + separate alpha + background + blended, all PNG directories."""
    folder = root / name
    folder.mkdir(parents=True)
    write_video(folder / "foreground", frames(seed, n))
    write_video(folder / "alpha", np.repeat(matte(n)[..., None], 3, axis=-1))
    write_video(folder / "background", frames(seed + 100, n))
    write_video(folder / "blended", frames(seed + 200, n))
    write_prompts(folder, foreground="a cross", background="dots", blended="a cross over dots")
    return folder


def check_layered(sample: dict, n: int = F, h: int = H, w: int = W) -> None:
    shapes = {"foreground_rgb": (n, 3, h, w), "foreground_alpha": (n, 1, h, w), "background": (n, 3, h, w),
              "blended": (n, 3, h, w)}
    for key, shape in shapes.items():
        assert tuple(sample[key].shape) == shape, key
        assert sample[key].dtype == torch.float32 and sample[key].min() >= 0 and sample[key].max() <= 1, key
    assert all(isinstance(sample[k], str) and sample[k] for k in ("foreground_prompt", "background_prompt", "prompt"))
    assert isinstance(sample["is_static"], bool)


def composited(sample: dict) -> torch.Tensor:
    a = sample["foreground_alpha"]
    return sample["foreground_rgb"] * a + sample["background"] * (1 - a)


# ----------------------------------------------------------------------------------------
# layerflow.folder
# ----------------------------------------------------------------------------------------
def test_folder_reads_rgba_files_and_split_layers(tmp_path):
    from layerkit_plugins.layerflow.folder import LayeredFolder

    rgba_sample(tmp_path, "a_mov", 1, n=10, suffix=".mov", h=40, w=48)  # resized to 32x32
    rgba_sample(tmp_path, "b_webm", 2, suffix=".webm")
    rgba_sample(tmp_path, "c_png", 3)
    split_sample(tmp_path, "d_split", 4)
    data = LayeredFolder(str(tmp_path), num_frames=4, height=H, width=W, stride=2)
    assert len(data) == 4
    samples = [data[i] for i in range(4)]
    for s in samples:
        check_layered(s, n=4)
        assert s["is_static"] is False
    mov, webm, png, split = samples
    for s in (mov, webm, png):  # blended composited from fg, alpha, bg
        torch.testing.assert_close(s["blended"], composited(s), atol=0, rtol=0)
        assert s["prompt"] == f"{s['foreground_prompt']} over {s['background_prompt']}"
    assert mov["foreground_alpha"].amax() > 0.9 and mov["foreground_alpha"].amin() < 0.05, "ProRes 4444 keeps alpha"
    assert webm["foreground_alpha"].amax() > 0.9 and webm["foreground_alpha"].amin() < 0.05, "VP9 keeps alpha"

    # PNG directories are lossless and already 32x32: frames 0, 2, 4, 6 exactly
    expected = torch.from_numpy(frames(3)[[0, 2, 4, 6]]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(png["foreground_rgb"], expected, atol=0, rtol=0)
    torch.testing.assert_close(png["foreground_alpha"][:, 0], torch.from_numpy(matte()[[0, 2, 4, 6]]).float() / 255,
                               atol=0, rtol=0)
    assert png["foreground_prompt"] == "a red circle 3" and png["source"].endswith("c_png")

    # separate alpha and given blended are read, not composited
    torch.testing.assert_close(split["blended"], torch.from_numpy(frames(204)[[0, 2, 4, 6]]).permute(0, 3, 1, 2).float()
                               / 255, atol=0, rtol=0)
    torch.testing.assert_close(split["foreground_alpha"][:, 0], torch.from_numpy(matte()[[0, 2, 4, 6]]).float() / 255,
                               atol=1e-6, rtol=0)  # the matte is the mean of its grey channels
    assert split["prompt"] == "a cross over dots"


def test_folder_options_random_start_crop_static_and_copy_paste(tmp_path):
    from layerkit_plugins.layerflow.folder import LayeredFolder

    clips = tmp_path / "clips"
    for i in range(3):
        rgba_sample(clips, f"s{i}", 10 + i, n=12)
    tag = lambda s: (s["foreground_rgb"][:, 0, 0, 0] * 255 / 10).round().long().tolist()  # noqa: E731

    runs = [tag(LayeredFolder(str(clips), num_frames=4, stride=2, random_start=True, seed=s)[0]) for s in range(12)]
    assert len({r[0] for r in runs}) > 1, "the start is drawn per seed"
    assert all(r == list(range(r[0], r[0] + 7, 2)) and r[-1] <= 11 for r in runs), "every frame inside the clip"

    wide = tmp_path / "wide"
    rgba_sample(wide, "w", 1, h=24, w=64)
    cropped = LayeredFolder(str(wide), num_frames=4, resize="crop")[0]
    check_layered(cropped, n=4)
    stretched = LayeredFolder(str(wide), num_frames=4, resize="stretch")[0]
    assert not torch.equal(cropped["foreground_alpha"], stretched["foreground_alpha"])

    static = LayeredFolder(str(clips), num_frames=4, static_fraction=1.0, size=6)
    for i in range(6):
        s = static[i]
        assert s["is_static"] is True
        for key in ("foreground_rgb", "foreground_alpha", "background", "blended"):
            assert torch.equal(s[key], s[key][:1].expand_as(s[key])), key

    pasted = LayeredFolder(str(clips), num_frames=4, copy_paste=True, size=6, seed=3)
    again = LayeredFolder(str(clips), num_frames=4, copy_paste=True, size=6, seed=3)
    for i in range(6):
        s = pasted[i]
        check_layered(s, n=4)
        torch.testing.assert_close(s["blended"], composited(s), atol=0, rtol=0)
        fg_seed, bg_seed = s["foreground_prompt"].split()[-1], s["background_prompt"].split()[-1]
        assert fg_seed != bg_seed, "the background comes from another sample"
        assert s["prompt"] == f"{s['foreground_prompt']} over {s['background_prompt']}"
        assert all(torch.equal(s[k], again[i][k]) for k in ("background", "blended")), "deterministic in (seed, index)"


def test_folder_errors_are_single_clear_sentences(tmp_path):
    from layerkit_plugins.layerflow.folder import LayeredFolder

    with pytest.raises(LayerkitError, match=r"needs a directory: set data.root"):
        LayeredFolder("???")
    with pytest.raises(LayerkitError, match="does not exist"):
        LayeredFolder(str(tmp_path / "nowhere"))
    with pytest.raises(LayerkitError, match="has no sample folders"):
        LayeredFolder(str(tmp_path))

    def fresh(name: str) -> Path:
        root = tmp_path / name
        rgba_sample(root, "ok", 1)
        return root

    root = fresh("no_bg")
    for p in (root / "ok" / "background").iterdir():
        p.unlink()
    (root / "ok" / "background").rmdir()
    with pytest.raises(LayerkitError, match=r"has no background layer; add background\.<ext>"):
        LayeredFolder(str(root))

    root = fresh("counts")
    write_video(root / "ok" / "background", frames(5, n=6), overwrite=True)
    with pytest.raises(LayerkitError, match=r"different frame counts \(foreground 8, background 6\)"):
        LayeredFolder(str(root), num_frames=4)[0]

    root = tmp_path / "no_alpha"
    (root / "s").mkdir(parents=True)
    write_video(root / "s" / "foreground.mp4", frames(1))
    write_video(root / "s" / "background.mp4", frames(2))
    write_prompts(root / "s", foreground="a", background="b")
    with pytest.raises(LayerkitError, match=r"foreground 'foreground.mp4' has no alpha channel and there is no alpha layer"):
        LayeredFolder(str(root), num_frames=4)[0]

    root = fresh("json")
    (root / "ok" / "prompts.json").write_text('{"foreground": "a", ')
    with pytest.raises(LayerkitError, match=r"prompts.json' is not valid JSON"):
        LayeredFolder(str(root))
    (root / "ok" / "prompts.json").write_text('["a", "b"]')
    with pytest.raises(LayerkitError, match=r"must hold a JSON object"):
        LayeredFolder(str(root))
    (root / "ok" / "prompts.json").write_text('{"foreground": "a"}')
    with pytest.raises(LayerkitError, match=r"lacks the prompt\(s\) 'background'"):
        LayeredFolder(str(root))
    (root / "ok" / "prompts.json").unlink()
    with pytest.raises(LayerkitError, match=r"prompts.json' is missing"):
        LayeredFolder(str(root))

    root = fresh("short")
    with pytest.raises(LayerkitError, match=r"has 8 frame\(s\); num_frames=4 with stride=3 needs at least 10"):
        LayeredFolder(str(root), num_frames=4, stride=3)[0]

    root = fresh("twice")
    write_video(root / "ok" / "foreground.webm", np.zeros((F, H, W, 4), np.uint8))
    with pytest.raises(LayerkitError, match=r"more than one foreground layer \(foreground, foreground.webm\)"):
        LayeredFolder(str(root))


# ----------------------------------------------------------------------------------------
# layerflow.images
# ----------------------------------------------------------------------------------------
def test_images_are_frozen_videos(tmp_path):
    from layerkit_plugins.layerflow.folder import LayeredImages

    for i in range(2):
        folder = tmp_path / f"img{i}"
        folder.mkdir()
        rgba = np.concatenate([frames(i, 1, 48, 40), matte(1, 48, 40)[..., None]], axis=-1)
        write_video(folder / "foreground.png", rgba)
        write_video(folder / "background.png", frames(i + 50, 1, 48, 40))
        write_prompts(folder, foreground=f"fg {i}", background=f"bg {i}", blended=f"scene {i}")
    data = LayeredImages(str(tmp_path), num_frames=5, height=H, width=W)
    for i in range(2):
        s = data[i]
        check_layered(s, n=5)
        assert s["is_static"] is True and s["prompt"] == f"scene {i}"
        for key in ("foreground_rgb", "foreground_alpha", "background", "blended"):
            assert torch.equal(s[key], s[key][:1].expand_as(s[key])), key
        torch.testing.assert_close(s["blended"], composited(s), atol=0, rtol=0)
    pasted = LayeredImages(str(tmp_path), num_frames=5, copy_paste=True)[0]
    assert pasted["background_prompt"] == "bg 1" and pasted["prompt"] == "fg 0 over bg 1"

    write_video(tmp_path / "img0" / "blended", frames(3, 2))  # a PNG directory is not an image
    write_video(tmp_path / "img1" / "foreground.png", frames(1, 1), overwrite=True)  # RGB, no alpha
    with pytest.raises(LayerkitError, match="has no alpha channel and there is no alpha layer"):
        LayeredImages(str(tmp_path))[1]


# ----------------------------------------------------------------------------------------
# layerflow.copy_paste
# ----------------------------------------------------------------------------------------
def make_pools(root: Path) -> tuple[Path, Path]:
    fgs, bgs = root / "fg", root / "bg"
    fgs.mkdir(parents=True)
    bgs.mkdir(parents=True)
    write_video(fgs / "cat.mov", np.concatenate([frames(1, 10), matte(10)[..., None]], axis=-1))
    write_video(fgs / "dog", np.concatenate([frames(2, 10), matte(10)[..., None]], axis=-1))
    (fgs / "prompts.json").write_text(json.dumps({"cat": "a cat walking", "dog": "a dog running"}))
    write_video(bgs / "beach.mp4", frames(3, 12, 40, 56))
    write_video(bgs / "street", frames(4, 9))
    (bgs / "prompts.json").write_text(json.dumps({"beach": "a beach", "street": "a street"}))
    return fgs, bgs


def test_copy_paste_composes_static_and_dynamic_samples(tmp_path):
    from layerkit_plugins.layerflow.folder import CopyPaste

    fgs, bgs = make_pools(tmp_path)
    data = CopyPaste(str(fgs), str(bgs), num_frames=4, stride=2, static_fraction=0.5, size=12, seed=1)
    samples = [data[i] for i in range(12)]
    assert {s["is_static"] for s in samples} == {True, False}
    for s in samples:
        check_layered(s, n=4)
        torch.testing.assert_close(s["blended"], composited(s), atol=0, rtol=0)
        assert s["prompt"] == f"{s['foreground_prompt']} over {s['background_prompt']}"
        assert s["foreground_prompt"] in ("a cat walking", "a dog running")
        frozen = all(torch.equal(s[k], s[k][:1].expand_as(s[k])) for k in ("foreground_rgb", "background"))
        assert frozen == s["is_static"]
    assert torch.equal(data[5]["blended"], CopyPaste(str(fgs), str(bgs), num_frames=4, stride=2, static_fraction=0.5,
                                                     size=12, seed=1)[5]["blended"])

    small = CopyPaste(str(fgs), str(bgs), num_frames=4, scale=[0.5, 0.5], random_start=False)[0]
    outside = small["foreground_alpha"][0, 0] == 0
    assert outside.sum() >= H * W - 16 * 16, "a half-size foreground leaves the rest of the frame transparent"

    with pytest.raises(LayerkitError, match="always copy-pastes"):
        CopyPaste(str(fgs), str(bgs), copy_paste=False)
    write_video(fgs / "owl.mp4", frames(5, 10))
    with pytest.raises(LayerkitError, match=r"prompts.json' has no prompt for 'owl'"):
        CopyPaste(str(fgs), str(bgs))
    (fgs / "prompts.json").write_text(json.dumps({"cat": "c", "dog": "d", "owl": "o"}))
    with pytest.raises(LayerkitError, match=r"foreground clip '.*owl.mp4' has no alpha channel"):
        CopyPaste(str(fgs), str(bgs), num_frames=4)[2]


# ----------------------------------------------------------------------------------------
# layerflow.mix
# ----------------------------------------------------------------------------------------
def test_mix_draws_named_datasets_by_weight_with_a_seed(tmp_path, registry):
    from layerkit_plugins.layerflow.folder import Mix

    for i in range(2):
        rgba_sample(tmp_path / "layers", f"s{i}", i)
    children = {"shapes": {"name": "layerflow.mixture", "size": 4, "static_fraction": 1.0},
                "files": {"name": "layerflow.folder", "root": str(tmp_path / "layers")}}
    mix = Mix(children, {"shapes": 0.8, "files": 0.2}, size=200, seed=0, num_frames=4)
    picks = [mix.pick(i)[0] for i in range(200)]
    assert 0.7 < picks.count("shapes") / 200 < 0.9
    assert picks == [Mix(children, {"shapes": 0.8, "files": 0.2}, size=200, seed=0, num_frames=4).pick(i)[0]
                     for i in range(200)]
    assert picks != [Mix(children, {"shapes": 0.8, "files": 0.2}, size=200, seed=1, num_frames=4).pick(i)[0]
                     for i in range(200)]
    first = {name: mix[picks.index(name)] for name in ("shapes", "files")}
    for name, s in first.items():
        check_layered(s, n=4)
        assert s["dataset"] == name
    assert first["shapes"]["is_static"] is True and first["files"]["is_static"] is False
    assert set(first["shapes"]) == set(first["files"]), "one schema whatever the child"

    with pytest.raises(LayerkitError, match="weights name"):
        Mix(children, {"shapes": 1.0})
    with pytest.raises(LayerkitError, match="non-negative numbers"):
        Mix(children, {"shapes": -1.0, "files": 0.5})
    wrong = {"files": {"name": "layerflow.folder", "root": str(tmp_path / "layers"), "height": 16}}
    with pytest.raises(LayerkitError, match=r"gives foreground_rgb of shape \(4, 3, 16, 32\)"):
        Mix(wrong, num_frames=4)[0]


def test_stage3_trains_two_steps_on_files_and_exports(registry, tmp_path):
    """+experiment=layerflow_stage3 on layerflow.mix: multi-layer images 0.8, copy-paste videos 0.2."""
    import json as _json

    from safetensors.torch import load_file

    from layerkit.training.run import train

    images = tmp_path / "images"
    for i in range(2):
        folder = images / f"img{i}"
        folder.mkdir(parents=True)
        write_video(folder / "foreground.png", np.concatenate([frames(i, 1), matte(1)[..., None]], axis=-1))
        write_video(folder / "background.png", frames(i + 9, 1))
        write_prompts(folder, foreground="a red circle", background="blue stripes")
    fgs, bgs = make_pools(tmp_path)
    out = train(["+experiment=layerflow_stage3", "backbone=cogvideox_tiny", "train.batch_size=1",
                 "data=layerflow_mix", "data.size=8", f"data.datasets.images.root={images}",
                 f"data.datasets.copy_paste.foregrounds={fgs}", f"data.datasets.copy_paste.backgrounds={bgs}",
                 "trainer.max_steps=2", "export.formats=[diffusers,comfyui]", f"output_dir={tmp_path / 'run'}"],
                registry=registry)
    record = _json.loads((out / "record.json").read_text())
    assert record["global_step"] == 2 and record["final_loss"] is not None
    assert record["config"]["data"]["name"] == "layerflow.mix"
    lora = [k for k in load_file(str(out / "weights.safetensors")) if ".lora_" in k]
    assert lora and all(".content_lora." in k for k in lora)
    exported = {Path(p).name for p in record["exported"]}
    assert {"content_lora.comfyui.safetensors", "content_lora.diffusers.safetensors"} <= exported
    comfy = load_file(str(out / "export" / "content_lora.comfyui.safetensors"))
    assert set(comfy) >= {"diffusion_model.blocks.5.q.lora_down.weight", "diffusion_model.blocks.11.attn_out.alpha"}
