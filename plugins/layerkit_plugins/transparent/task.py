"""Transparent video tasks (Layer-Animate, seed 003): ``transparent.i2v`` and ``transparent.t2v``.

A sample is one RGBA clip ``rgba`` [B, F, 4, H, W] in [0, 1] (straight alpha) and its prompt.
Frames travel to the backbone as one 4-channel segment (straight RGB and alpha, both in
[-1, 1]); the backbone's LayerDiffuse offset encoder turns them into transparent latents.

Stage 2 (both tasks) gives the reference frame m (``Packed.given`` [B, F] marks it): it is never
noised, re-imposed at every sampling step and left out of the loss; ``extras`` carries
``reference_frame`` = m for the Inter-Frame Attention adapter. ``given_reference: false``
gives nothing: every frame is generated from the prompt (the text-to-video base the toy trains
before stage 2). A share between 0 and 1 gives the reference to that share of the training
clips, drawn per clip from torch's global generator (seeded by ``seed``), and trains text-to-video on the rest (one
model for both, the way image-to-video models are trained with the image dropped); sampling
then gives it.

i2v: the reference is the user's RGBA image (``inputs.image``) or, without any input, the middle
frame of a held-out shapes-world clip (whose ground truth then scores the result).

t2v = stage 1 then stage 2. Its samples carry ``stage1`` (and no reference); the sampling stage
``transparent.image`` (added by the ``transparent_t2v`` task config as ``stages.image``) makes the
transparent middle frame from the prompt with the backbone's SD 1.5 image UNet, LayerDiffuse
transparent attention and transparent decoder, and stage 2 packs it as above. Training a t2v
config trains stage 2 exactly as i2v does (stage 1 is LayerDiffuse, trained elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit.protocols import Packed, Segment, Task
from layerkit_plugins.transparent import FILE_KEYS, INPUT_KEYS
from layerkit_plugins.transparent.inter_frame import reference_frame


class TransparentTask(Task):
    input_keys = INPUT_KEYS
    file_keys = FILE_KEYS

    def __init__(self, mode: str = "i2v", reference: int | None = None, default_seed: int = 0,
                 num_samples: int = 1, given_reference: bool | float = True) -> None:
        if mode not in ("i2v", "t2v"):
            raise LayerkitError(f"unknown transparent mode '{mode}'; modes are i2v, t2v.")
        try:
            share = float(given_reference)
        except (TypeError, ValueError):
            share = float("nan")
        if not 0.0 <= share <= 1.0:
            raise LayerkitError(f"task.given_reference is true, false or the share of training clips given their "
                                f"reference frame, between 0 and 1; got {given_reference}.")
        self.mode, self.reference = mode, reference
        self.given_reference, self.reference_share = share > 0, share
        self.name = f"transparent.{mode}"
        self.default_seed, self.num_samples = default_seed, num_samples

    def reference_index(self, num_frames: int) -> int:
        m = reference_frame(num_frames) if self.reference is None else int(self.reference)
        if not 0 <= m < num_frames:
            raise LayerkitError(f"reference frame {m} is outside a clip of {num_frames} frames.")
        return m

    # -- packing ----------------------------------------------------------------------------
    def pack(self, batch: dict[str, Any], *, training: bool) -> Packed:
        rgba = batch.get("rgba")
        if rgba is not None:
            if rgba.dim() != 5 or rgba.shape[2] != 4:
                raise LayerkitError(f"'rgba' must be [B, F, 4, H, W]; got {tuple(rgba.shape)}.")
            b, f, _, h, w = rgba.shape
            video: torch.Tensor | None = rgba.float() * 2 - 1
        else:
            if training:
                raise LayerkitError(f"task '{self.name}' needs 'rgba' clips to train on.")
            video = None
            missing = [k for k in ("num_frames", "height", "width") if k not in batch]
            if missing:
                raise LayerkitError(f"task '{self.name}' needs {missing} (or an 'rgba' clip) to sample.")
            b = len(self._prompts(batch, None))
            f, h, w = (_first(batch[k]) for k in ("num_frames", "height", "width"))
        m = self.reference_index(f)
        prompts = [[p] for p in self._prompts(batch, b)]
        extras = {"reference_frame": m}
        given = torch.zeros(b, f, dtype=torch.bool)
        if not self.given_reference:  # every frame generated (text-to-video)
            return Packed([Segment("video", f, video if training else None)], given, prompts, h, w, extras=extras)
        ref = batch.get("reference")
        if ref is not None:  # an RGBA image [B, 4, H, W] in [0, 1]: the user's, or stage 1's
            reference = ref.float()[:, None] * 2 - 1
        elif video is not None:
            reference = video[:, m : m + 1]
        elif self.mode == "t2v":
            raise LayerkitError(
                "transparent.t2v generates its middle frame with stage 1 first, but no stage-1 image reached the "
                "task: keep stages.image (the transparent_image stage that task=transparent_t2v adds)."
            )
        else:
            raise LayerkitError("transparent.i2v needs a reference RGBA image (inputs.image) or an 'rgba' clip.")
        if video is None or not training:
            video = reference.new_zeros(b, f, *reference.shape[2:])
        video = video.clone()
        video[:, m : m + 1] = reference
        given[:, m] = True
        if training and self.reference_share < 1.0:  # the rest of the clips: text-to-video
            given[:, m] = torch.rand(b) < self.reference_share
        return Packed([Segment("video", f, video)], given, prompts, h, w, extras=extras)

    def _prompts(self, batch: dict[str, Any], b: int | None) -> list[str]:
        value = batch.get("prompt")
        if value is None:
            raise LayerkitError(f"task '{self.name}' needs a 'prompt' per sample.")
        prompts = [value] * (b or 1) if isinstance(value, str) else list(value)
        if b is not None and len(prompts) != b:
            raise LayerkitError(f"got {len(prompts)} prompts for {b} samples.")
        return prompts

    # -- sampling inputs ----------------------------------------------------------------------
    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int,
                      num_frames: int) -> list[dict[str, Any]]:
        """One sample per output. With no input, held-out shapes-world sprite clips give the
        prompt, (i2v) the reference frame and the ground truth the evaluator scores against.
        With any input, only the user's: ``prompt`` and ``image`` (an RGBA image file); t2v marks
        each sample for stage 1 (``stage1``, ``sample_index``) unless an image is given."""
        from layerkit.data.shapes import ShapesConfig, held_out_seed
        from layerkit_plugins.transparent.data import make_rgba_sprite_clip

        n = int(inputs.get("num_samples", self.num_samples))
        if n < 1:
            raise LayerkitError(f"inputs.num_samples must be at least 1; got {n}.")
        seed = int(inputs.get("seed", self.default_seed))
        split = str(inputs.get("split", "test"))  # held-out clips: test (records), val (choosing settings)
        cfg = ShapesConfig(num_frames=num_frames, height=height, width=width)
        user = bool(inputs.get("prompt") or inputs.get("image"))
        image, fitted = (read_rgba_image(inputs["image"], height, width, str(inputs.get("fit", "pad")))
                         if inputs.get("image") else (None, None))
        if self.mode == "i2v" and user and image is None:
            raise LayerkitError("transparent.i2v animates an RGBA image: give inputs.image=FILE (or use "
                                "task=transparent_t2v to make the image from the prompt).")
        samples = []
        for i in range(n):
            sample: dict[str, Any] = {"num_frames": num_frames, "height": height, "width": width}
            if user:
                sample["prompt"] = str(inputs.get("prompt") or "")
                notes = [] if inputs.get("prompt") else ["inputs.prompt not given: empty prompt"]
                if fitted:
                    notes.append(fitted)
                if notes:
                    sample["notes"] = notes
            else:
                clip = make_rgba_sprite_clip(held_out_seed(split, seed, i), cfg)
                sample["prompt"] = clip["prompt"]
                sample["ground_truth"] = clip
            if image is not None:
                sample["reference"] = image
            elif self.mode == "t2v":
                sample["stage1"] = True
                sample["sample_index"] = i
            else:
                sample["reference"] = clip["rgba"][self.reference_index(num_frames)]
            samples.append(sample)
        return samples

    # -- outputs ------------------------------------------------------------------------------
    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Segments back in time order -> per sample ``foreground`` [F, 4, H, W] (or RGB when the
        backbone has no transparent decoder) and ``alpha`` [F, 1, H, W], in [0, 1]."""
        video = ((decoded["video"].float() + 1) / 2).clamp(0, 1)
        outputs = []
        for clip in video:
            layers = {"foreground": clip}
            if clip.shape[1] == 4:
                layers["alpha"] = clip[:, 3:]
            outputs.append(layers)
        return outputs

    def evaluate_samples(self, outputs: list[dict[str, torch.Tensor]],
                         batch: dict[str, Any]) -> list[dict[str, float]] | None:
        truth = batch.get("ground_truth")
        if not truth or outputs[0]["foreground"].shape[1] != 4:
            return None
        from layerkit_plugins.transparent.evaluate import evaluate_rgba_video

        return [evaluate_rgba_video(out["foreground"], t) for out, t in zip(outputs, truth, strict=True)]


def _first(value: Any) -> int:
    """An int from a collated field (int, list or tensor [B])."""
    if isinstance(value, torch.Tensor):
        return int(value.flatten()[0])
    if isinstance(value, list | tuple):
        return int(value[0])
    return int(value)


def read_rgba_image(path: str | Path, height: int, width: int, fit: str = "pad") -> tuple[torch.Tensor, str | None]:
    """An image file (8 or 16 bits) -> [4, H, W] straight RGBA in [0, 1] (opaque when it has no
    alpha), fitted to the size with its aspect ratio kept (``pad``: transparent borders, the
    default, so no part of the element is cut; ``crop``; ``stretch``), and a note saying what was
    done (None when the size matched)."""
    import numpy as np

    from layerkit.io.video import fit_frames, read_image, unit_float

    image = read_image(path, name="inputs.image")
    if image.shape[-1] == 3:
        image = np.dstack([image, np.full(image.shape[:2], np.iinfo(image.dtype).max, image.dtype)])
    rgba = torch.from_numpy(unit_float(image)).permute(2, 0, 1)
    fitted, note = fit_frames(rgba[None], height, width, fit, name="inputs.image")
    return fitted[0], note


def i2v_task(**kwargs: Any) -> TransparentTask:
    return TransparentTask(mode="i2v", **kwargs)


def t2v_task(**kwargs: Any) -> TransparentTask:
    return TransparentTask(mode="t2v", **kwargs)
