"""The learned curation steps: real code paths on tiny random weights, and one sentence for a weights
path that does not exist or holds another model. Nothing is downloaded."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from layerkit_plugins.curation.evaluate import frames_uint8
from layerkit_plugins.curation.flow import OpenCVFlow

from layerkit.data.shapes import ShapesConfig, make_sample
from layerkit.errors import LayerkitError

FRAMES = frames_uint8(make_sample(1, ShapesConfig(num_frames=3, height=64, width=64)))


def test_raft_from_local_weights_and_its_errors(tmp_path):
    from layerkit_plugins.curation.flow import RaftFlow
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    weights = tmp_path / "raft_small.safetensors"
    save_file(raft_small(weights=None).state_dict(), str(weights))
    step = RaftFlow(str(weights), num_flow_updates=2, device="cpu")
    assert step.variant == "raft_small"
    flow = step(FRAMES)
    assert flow.forward.shape == (2, 64, 64, 2) and flow.backward.shape == (2, 64, 64, 2)

    with pytest.raises(LayerkitError, match="does not exist"):
        RaftFlow(str(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(LayerkitError, match="holds no torchvision RAFT weights"):
        RaftFlow(str(other))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"no weights here")
    with pytest.raises(LayerkitError, match="could not be read as a weights file"):
        RaftFlow(str(junk))


def test_lineart_from_local_weights_and_its_errors(tmp_path):
    from layerkit_plugins.curation.sketch import LineArtSketch, line_drawing_generator

    torch.manual_seed(0)
    weights = tmp_path / "sk_model.pth"
    torch.save(line_drawing_generator(3).state_dict(), weights)
    lines = LineArtSketch(str(weights), device="cpu")(FRAMES[:, :30, :30])
    assert lines.shape == (3, 30, 30) and lines.min() >= 0 and lines.max() <= 1

    other = tmp_path / "other.pth"
    torch.save({"model0.1.weight": torch.zeros(1)}, other)
    with pytest.raises(LayerkitError, match="holds no informative-drawings line-art generator weights"):
        LineArtSketch(str(other))
    with pytest.raises(LayerkitError, match="needs local weights and none were given: set sketch.path="):
        LineArtSketch(None)


def test_cotracker3_checkout_checkpoint_and_call(tmp_path, monkeypatch):
    from layerkit_plugins.curation.track import CoTracker3Tracker

    with pytest.raises(LayerkitError, match="does not exist"):
        CoTracker3Tracker(str(tmp_path / "missing"), str(tmp_path / "ckpt.pth"))
    checkout = tmp_path / "co-tracker"
    (checkout / "cotracker").mkdir(parents=True)
    with pytest.raises(LayerkitError, match="is not a checkout of facebookresearch/co-tracker"):
        CoTracker3Tracker(str(checkout), str(tmp_path / "ckpt.pth"))
    # a stand-in predictor with CoTracker's interface: points stay where they were queried
    (checkout / "cotracker" / "__init__.py").write_text("")
    (checkout / "cotracker" / "predictor.py").write_text(
        "import torch\n"
        "class CoTrackerPredictor(torch.nn.Module):\n"
        "    def __init__(self, checkpoint, offline=True, window_len=60):\n"
        "        super().__init__()\n"
        "        self.checkpoint = checkpoint\n"
        "    def forward(self, video, queries=None):\n"
        "        b, t = video.shape[:2]\n"
        "        tracks = queries[:, None, :, 1:].expand(b, t, -1, -1)\n"
        "        return tracks, torch.ones(tracks.shape[:3])\n")
    wrong = tmp_path / "wrong.pth"
    torch.save({"backbone.weight": torch.zeros(1)}, wrong)
    with pytest.raises(LayerkitError, match="holds no CoTracker3 weights"):
        CoTracker3Tracker(str(checkout), str(wrong))
    checkpoint = tmp_path / "scaled_offline.pth"
    torch.save({"fnet.conv1.weight": torch.zeros(1), "updateformer.x": torch.zeros(1)}, checkpoint)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cotracker", raising=False)
    monkeypatch.delitem(sys.modules, "cotracker.predictor", raising=False)
    tracker = CoTracker3Tracker(str(checkout), str(checkpoint), device="cpu")
    points = np.array([[3.0, 4.0], [10.5, 20.0]], np.float32)
    tracks, vis = tracker(FRAMES, points, OpenCVFlow()(FRAMES))
    assert tracks.shape == (3, 2, 2) and np.allclose(tracks[2], points) and vis.min() == 1
    for name in ("cotracker.predictor", "cotracker"):
        sys.modules.pop(name, None)


def test_sam2_weights_errors(tmp_path):
    from layerkit_plugins.curation.sam2 import Sam2Segmenter

    with pytest.raises(LayerkitError, match="does not exist"):
        Sam2Segmenter(str(tmp_path / "missing"))
    with pytest.raises(LayerkitError, match="has no config.json"):
        Sam2Segmenter(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LayerkitError, match="holds a bert model, not SAM 2"):
        Sam2Segmenter(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(LayerkitError, match="holds the SAM 2 image model"):
        Sam2Segmenter(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam2_video"}))
    with pytest.raises(LayerkitError, match="no SAM 2 processor configuration"):
        Sam2Segmenter(str(tmp_path))


def tiny_sam2(directory, size: int = 128) -> None:
    """A random SAM 2 video model small enough for a CPU test, saved with its processor."""
    from transformers import Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    backbone = {"model_type": "sam2_hiera_det_model", "hidden_size": 12, "num_attention_heads": 1,
                "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [12, 24, 48, 96],
                "num_attention_heads_per_stage": [1, 1, 1, 1], "window_size_per_stage": [4, 4, 4, 4],
                "global_attention_blocks": [3], "window_positional_embedding_background_size": [4, 4],
                "image_size": [size, size]}
    vision = {"backbone_config": backbone, "backbone_channel_list": [96, 48, 24, 12], "fpn_hidden_size": 128,
              "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2]}
    config = Sam2VideoConfig(
        vision_config=vision, image_size=size, num_maskmem=3,
        prompt_encoder_config={"hidden_size": 128, "image_size": size, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 64,
                             "iou_head_hidden_dim": 32},
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[size // 16] * 2, memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=64)
    torch.manual_seed(0)
    Sam2VideoModel(config).save_pretrained(directory)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size={"height": size, "width": size},
                                                           mask_size={"height": size // 4, "width": size // 4}),
                       video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size}),
                       target_size=size).save_pretrained(directory)


@pytest.mark.slow
def test_sam2_segments_with_a_tiny_random_model(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("about 25 s on 2 CPU cores; run with -m slow")
    from layerkit_plugins.curation.sam2 import Sam2Segmenter

    tiny_sam2(tmp_path / "sam2")
    step = Sam2Segmenter(str(tmp_path / "sam2"), points_per_side=2, pred_iou_threshold=0.0,
                         stability_threshold=0.0, device="cpu")
    frames = frames_uint8(make_sample(0, ShapesConfig(num_frames=5, height=32, width=32)))
    labels = step(frames)
    assert labels.shape == (5, 32, 32) and labels.dtype == np.int32 and labels.max() >= 1
