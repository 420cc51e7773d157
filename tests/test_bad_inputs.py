"""Every bad input fails with one clear sentence and leaves no partial output."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, TINY_SAMPLE, run_cli

from layerkit.errors import LayerkitError, ShapeError
from layerkit.io.weights import load_weights, save_weights
from layerkit.layers import check_frame_counts, pad_layers
from layerkit.sampling.run import sample
from layerkit.training.run import train


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith(".") and len(message) < 400, message


def _fails(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(LayerkitError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    _one_sentence(message)
    assert match in message, message
    return message


def _sample_args(out, *extra):
    return ["+experiment=toy_layered", *TINY_SAMPLE, f"output_dir={out}", *extra]


def test_missing_weights_file(registry, tmp_path):
    out = tmp_path / "out"
    _fails(sample, _sample_args(out, f"weights={tmp_path / 'nope.safetensors'}"), registry=registry,
           match="does not exist")
    assert not out.exists()


def test_missing_input_video(registry, tmp_path):
    out = tmp_path / "out"
    _fails(sample, _sample_args(out, "task=layered_decompose", f"+inputs.blended={tmp_path / 'missing.mp4'}"),
           registry=registry, match="missing.mp4")
    assert not out.exists()


def test_corrupt_video(registry, tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x01not a video" * 100)
    out = tmp_path / "out"
    _fails(sample, _sample_args(out, "task=layered_decompose", f"+inputs.blended={bad}"), registry=registry,
           match="corrupt.mp4")
    assert not out.exists()


def test_checkpoint_that_is_not_safetensors(registry, tmp_path):
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, pickle)
    out = tmp_path / "out"
    _fails(sample, _sample_args(out, f"weights={pickle}"), registry=registry, match="not a safetensors file")
    assert not out.exists()
    # explicitly allowed, it is read with weights_only=True (a tensor mapping comes back)
    assert set(load_weights(pickle, allow_pickle=True)) == {"w"}


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    _fails(load_weights, path, allow_pickle=True, match="weights_only=True")


def test_weights_for_another_model(registry, tmp_path):
    wrong = save_weights(tmp_path / "w.safetensors", {"backbone.denoiser.nope": torch.zeros(2)})
    _fails(sample, _sample_args(tmp_path / "out", f"weights={wrong}"), registry=registry, match="does not have")


def test_existing_output_dir_without_overwrite(registry, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(sample, _sample_args(out), registry=registry, match="overwrite=true")
    _fails(train, ["+experiment=toy_layered", *TINY, f"output_dir={out}"], registry=registry,
           match="overwrite=true")
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_wrong_tensor_shape(registry):
    from layerkit_plugins.layered.task import LayeredTask

    batch = {"foreground_rgb": torch.rand(1, 4, 3, 8, 8), "foreground_alpha": torch.rand(1, 4, 3, 8, 8),
             "background": torch.rand(1, 4, 3, 8, 8), "blended": torch.rand(1, 4, 3, 8, 8),
             "foreground_prompt": ["a"], "background_prompt": ["b"], "prompt": ["c"]}
    with pytest.raises(ShapeError) as info:
        LayeredTask().pack(batch, training=True)
    _one_sentence(str(info.value))
    assert "foreground_alpha" in str(info.value) and "[B, F, 1, H, W]" in str(info.value)


def test_mismatched_frame_counts():
    msg = _fails(check_frame_counts, {"foreground": torch.zeros(16, 3), "background": torch.zeros(12, 3)},
                 match="different frame counts")
    assert "foreground=16" in msg and "background=12" in msg


def test_more_layers_than_capacity():
    _fails(pad_layers, torch.zeros(6, 2, 1, 4, 4), 4, name="layer_masks", match="capacity is 4")
    padded, validity = pad_layers(torch.ones(3, 2), 4)
    assert padded.shape == (4, 2) and validity.tolist() == [True, True, True, False]


def test_unknown_names_list_what_exists(registry):
    from layerkit.config import compose

    msg = _fails(compose, "train", ["backbone.name=nope"], registry, match="available backbones")
    assert "toy.dit" in msg
    _fails(compose, "train", ["+adapters.x={name: nope}"], registry, match="available adapters")


def test_a_removed_key_that_another_refers_to_is_one_sentence(registry):
    from layerkit.config import compose

    # the toy LayerFlow's stage 3 reads its stage-1 file through ${layerflow.stage1_weights}
    msg = _fails(compose, "sample", ["+experiment=toy_layerflow_stage3", "~layerflow.stage1_weights"], registry,
                 match="does not resolve")
    assert "layerflow.stage1_weights" in msg and "'~'" in msg
    msg = _fails(compose, "sample", ["backbone.path=${pkg:no_such_package/x}"], registry, match="not installed")
    assert msg.startswith("config value ${pkg:no_such_package/x} names package")  # the resolver's own sentence


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = run_cli("sample", "+experiment=toy_layered", f"weights={tmp_path / 'missing.safetensors'}",
                     f"output_dir={tmp_path / 'o'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("layerkit: error: weights file") and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
