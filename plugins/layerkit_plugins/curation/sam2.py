"""SAM 2 element segmentation (seed 001 sec. 3.1) through transformers, from local weights.

``path`` is a directory written by ``save_pretrained`` holding a SAM 2 video model
(``model_type: sam2_video``, e.g. a local copy of facebook/sam2.1-hiera-tiny) and its processor
configuration. On every key frame (every ``key_interval`` frames) automatic masks come from a grid
of single-point prompts through ``Sam2Model`` (kept when the predicted IoU and the stability
score are high, overlapping ones removed by mask NMS); the paper's loop (segment.key_frame_loop)
keeps those the masklets do not already cover and propagates them forward and backward with
``Sam2VideoModel``; a pixel claimed by several objects goes to the one with the highest logit.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.flow import Flow
from layerkit_plugins.curation.segment import key_frame_loop
from layerkit_plugins.curation.steps import check_frames, local_path, resolve_device

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_sam2_dir(path: Any) -> str:
    """The directory's ``model_type`` when it holds a SAM 2 video model, else one sentence why not."""
    p = local_path(path, "SAM 2", "segmenter.path", kind="dir")
    config = p / "config.json"
    if not config.is_file():
        raise LayerkitError(f"SAM 2 weights directory '{p}' has no config.json; give a directory written by "
                            "save_pretrained (a local copy of e.g. facebook/sam2.1-hiera-tiny).")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as exc:
        raise LayerkitError(f"'{config}' is not valid JSON ({exc}).") from None
    if model_type == "sam2":
        raise LayerkitError(f"'{p}' holds the SAM 2 image model; propagation needs the video model "
                            "(model_type sam2_video, e.g. facebook/sam2.1-hiera-tiny).")
    if model_type != "sam2_video":
        raise LayerkitError(f"'{p}' holds a {model_type or 'unknown'} model, not SAM 2 (model_type sam2_video).")
    if not any((p / name).is_file() for name in ("processor_config.json", "preprocessor_config.json",
                                                 "video_preprocessor_config.json")):
        raise LayerkitError(f"'{p}' has no SAM 2 processor configuration (preprocessor_config.json); "
                            "save the processor beside the model.")
    return str(p)


def stability(logits: Any, delta: float = 1.0) -> Any:
    """SAM's stability score: IoU of the mask thresholded at +delta and at -delta, per mask [..., H, W]."""
    inner = (logits > delta).flatten(-2).sum(-1).float()
    outer = (logits > -delta).flatten(-2).sum(-1).float()
    return inner / outer.clamp(min=1)


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS over bool masks [K, H, W] by descending score."""
    flat = masks.reshape(len(masks), -1)
    kept: list[int] = []
    for i in np.argsort(-scores):
        ok = True
        for j in kept:
            inter = np.logical_and(flat[i], flat[j]).sum()
            union = np.logical_or(flat[i], flat[j]).sum()
            if union and inter / union > iou:
                ok = False
                break
        if ok:
            kept.append(int(i))
    return kept


class Sam2Segmenter:
    """SAM 2 automatic masks on key frames + video propagation (module doc)."""

    role = "segmenter"

    def __init__(self, path: str | None = None, key_interval: int = 4, new_overlap: float = 0.5,
                 points_per_side: int = 16, points_per_batch: int = 64, pred_iou_threshold: float = 0.8,
                 stability_threshold: float = 0.9, nms_iou: float = 0.7, min_area_share: float = 0.001,
                 device: str = "auto", dtype: str = "fp32") -> None:
        directory = check_sam2_dir(path)
        if dtype not in DTYPES:
            raise LayerkitError(f"segmenter.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'.")
        import torch
        from transformers import Sam2Model, Sam2Processor, Sam2VideoModel, Sam2VideoProcessor

        self.device = resolve_device(device)
        self.dtype = getattr(torch, DTYPES[dtype])
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the image model reads the video checkpoint's subset: expected, not news
        try:
            self.video_model = Sam2VideoModel.from_pretrained(directory, dtype=self.dtype).to(self.device).eval()
            self.image_model = Sam2Model.from_pretrained(directory, dtype=self.dtype).to(self.device).eval()
            self.processor = Sam2Processor.from_pretrained(directory)
            self.video_processor = Sam2VideoProcessor.from_pretrained(directory)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LayerkitError(f"SAM 2 could not be loaded from '{directory}' ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]}).") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.key_interval, self.new_overlap = int(key_interval), float(new_overlap)
        self.points_per_side, self.points_per_batch = int(points_per_side), int(points_per_batch)
        self.pred_iou_threshold, self.stability_threshold = float(pred_iou_threshold), float(stability_threshold)
        self.nms_iou, self.min_area_share = float(nms_iou), float(min_area_share)
        self._torch = torch

    def automatic_masks(self, frame: np.ndarray) -> list[np.ndarray]:
        """SAM's automatic mask generation on one RGB frame [H, W, 3]: bool masks, best first."""
        torch = self._torch
        h, w = frame.shape[:2]
        inputs = self.processor(images=frame, return_tensors="pt")
        with torch.inference_mode():
            embeddings = self.image_model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
        n = self.points_per_side
        xs = (np.arange(n) + 0.5) * w / n
        ys = (np.arange(n) + 0.5) * h / n
        grid = [[float(x), float(y)] for y in ys for x in xs]
        masks, scores = [], []
        for i in range(0, len(grid), self.points_per_batch):
            batch = grid[i : i + self.points_per_batch]
            prompts = self.processor(input_points=[[[p] for p in batch]], input_labels=[[[1] for _ in batch]],
                                     original_sizes=[[h, w]], return_tensors="pt")
            with torch.inference_mode():
                out = self.image_model(image_embeddings=embeddings,
                                       input_points=prompts["input_points"].to(self.device, self.dtype),
                                       input_labels=prompts["input_labels"].to(self.device), multimask_output=True)
            logits = self.processor.post_process_masks(out.pred_masks.float().cpu(), [[h, w]], binarize=False)[0]
            iou = out.iou_scores.float().cpu()[0]  # [B, 3]
            stable = stability(logits)  # [B, 3]
            good = (iou >= self.pred_iou_threshold) & (stable >= self.stability_threshold)
            for b, m in zip(*torch.nonzero(good, as_tuple=True)):
                mask = (logits[b, m] > 0).numpy()
                if mask.sum() >= self.min_area_share * h * w:
                    masks.append(mask)
                    scores.append(float(iou[b, m]))
        if not masks:
            return []
        stack = np.stack(masks)
        return [stack[i] for i in mask_nms(stack, np.asarray(scores), self.nms_iou)]

    def propagate(self, frames: np.ndarray, seed: np.ndarray, k: int) -> np.ndarray:
        """Propagate the elements of ``seed`` (labels [H, W] at frame k) through the clip: labels [F, H, W]."""
        torch = self._torch
        f, h, w = frames.shape[:3]
        ids = [int(i) for i in np.unique(seed) if i > 0]
        session = self.video_processor.init_video_session(video=list(frames), inference_device=self.device,
                                                          dtype=self.dtype)
        self.video_processor.add_inputs_to_inference_session(
            session, frame_idx=k, obj_ids=ids, input_masks=[seed == i for i in ids])
        best = np.full((f, h, w), -np.inf, np.float32)
        labels = np.zeros((f, h, w), np.int32)
        with torch.inference_mode():
            for reverse in (False, True):
                for out in self.video_model.propagate_in_video_iterator(session, start_frame_idx=k, reverse=reverse):
                    logits = self.video_processor.post_process_masks(
                        [out.pred_masks.float().cpu()], original_sizes=[[h, w]], binarize=False)[0][:, 0].numpy()
                    t = out.frame_idx
                    for j, obj in enumerate(session.obj_ids):
                        better = (logits[j] > 0) & (logits[j] > best[t])
                        labels[t][better] = obj
                        best[t][better] = logits[j][better]
        labels[k] = np.where(seed > 0, seed, labels[k])
        return labels

    def __call__(self, frames: np.ndarray, flow: Flow | None = None) -> np.ndarray:
        frames = check_frames(frames)
        f, h, w = frames.shape[:3]
        return key_frame_loop(f, (h, w), lambda k: self.automatic_masks(frames[k]),
                              lambda seed, k: self.propagate(frames, seed, k), self.key_interval, self.new_overlap)
