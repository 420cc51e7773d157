"""LayerAnimate's training-time choices (paper sec. 4.4 and the released loader), as pure functions
on one sample (``schema.py``), every draw from an explicit ``torch.Generator``.

- **i2v vs interpolation** 50/50 (the loader's ``p_single_frame = 0.5``). The mode decides which
  keyframes a sample is built with, so it is drawn first and the sample built in that mode.
- **Layer-mask dropout** 10% per given layer, "simulating incomplete user annotations". The paper
  does not say what a dropped layer becomes; here it becomes what a user who did not annotate it
  gives (and what the authors' demos give for unused layers): an *invalid* layer with empty
  masks, not static, and no controls. Its pixels then belong to no layer. (Emptying the mask but
  keeping the layer valid would feed the fusion a layer the demos never show.) Every layer may be
  dropped; the fusion then weighs all layers uniformly, as the authors' masked softmax does.
- **One control per kept layer**, drawn 20% motion score, 40% trajectory, 40% sketch; the other
  two get their "no control" values: motion score -1, trajectory heatmap -1 with zero offsets,
  an all-white sketch. The draw ignores availability (a layer drawn "trajectory" without tracks has
  no control). Invalid layers get no control. The trajectory map is rendered again from the tracks
  of the layers that keep it, so its offsets are normalised by *their* largest offset, as at
  inference where only the controlled layers have tracks.
- **Horizontal flip** with probability 0.5: frames, keyframes, masks, sketches and trajectory maps
  are mirrored and the offsets' x component negated (the loader flips the rendered map the same
  way); tracks (and the shapes world's ground truth) map x -> W - 1 - x.

Draw order (fixed, so a generator state gives the same choices whatever the sample): one uniform
for the mode, N uniforms for dropout, N categorical draws for the controls, one uniform for the flip.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit_plugins.layeranimate.layers import MODES, NO_MOTION_SCORE, check_mode
from layerkit_plugins.layeranimate.trajectory import no_trajectory, trajectory_maps

__all__ = [
    "CONTROLS", "CONTROL_PROBS", "P_DROP", "P_FLIP", "P_I2V", "TrainingChoices", "apply_training_choices",
    "draw_training_choices", "drop_layers", "hflip_sample", "keep_one_control", "render_trajectory",
]

CONTROLS: tuple[str, ...] = ("motion_score", "trajectory", "sketch")
CONTROL_PROBS: tuple[float, float, float] = (0.2, 0.4, 0.4)
P_DROP = 0.1
P_I2V = 0.5
P_FLIP = 0.5


@dataclass(frozen=True)
class TrainingChoices:
    """What :func:`draw_training_choices` drew: the mode, per layer whether its mask is dropped
    and which control it keeps, and whether to flip."""

    mode: str
    dropped: tuple[bool, ...]
    controls: tuple[str, ...]
    flip: bool


def draw_training_choices(generator: torch.Generator, capacity: int = 4, p_drop: float = P_DROP,
                          control_probs: Sequence[float] = CONTROL_PROBS, p_i2v: float = P_I2V,
                          p_flip: float = P_FLIP) -> TrainingChoices:
    """Draw one sample's choices (see the module docstring for the order of draws)."""
    for name, p in (("p_drop", p_drop), ("p_i2v", p_i2v), ("p_flip", p_flip)):
        if not 0.0 <= p <= 1.0:
            raise LayerkitError(f"{name} is {p}; expected a probability in [0, 1].")
    probs = torch.as_tensor(control_probs, dtype=torch.float64)
    if probs.shape != (len(CONTROLS),) or (probs < 0).any() or probs.sum() <= 0:
        raise LayerkitError(f"control_probs is {list(control_probs)}; expected {len(CONTROLS)} non-negative weights "
                            f"for {', '.join(CONTROLS)}.")
    mode = MODES[0] if float(torch.rand((), generator=generator)) < p_i2v else MODES[1]
    dropped = (torch.rand(capacity, generator=generator) < p_drop).tolist()
    picks = torch.multinomial(probs, capacity, replacement=True, generator=generator).tolist()
    flip = float(torch.rand((), generator=generator)) < p_flip
    return TrainingChoices(mode, tuple(bool(d) for d in dropped), tuple(CONTROLS[i] for i in picks), bool(flip))


def _copy(sample: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    for key, value in sample.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.clone()
        elif isinstance(value, dict):
            out[key] = copy.deepcopy(value)
    return out


def render_trajectory(sample: dict[str, Any]) -> torch.Tensor:
    """The trajectory map ``[N, F, 3, H, W]`` of the sample's ``tracks`` / ``track_layer``."""
    n, num_frames, _, height, width = sample["sketch"].shape
    if sample["track_layer"].numel() == 0:
        return no_trajectory(n, num_frames, height, width)
    return trajectory_maps(sample["tracks"], sample["track_layer"], height, width, n)


def _keep_tracks(sample: dict[str, Any], layers: torch.Tensor) -> None:
    keep = layers[sample["track_layer"]] if sample["track_layer"].numel() else sample["track_layer"].bool()
    sample["tracks"] = sample["tracks"][:, keep]
    sample["track_layer"] = sample["track_layer"][keep]


def drop_layers(sample: dict[str, Any], dropped: Sequence[bool]) -> dict[str, Any]:
    """A copy where every given layer with ``dropped[i]`` becomes invalid, empty, dynamic and without
    controls (its tracks removed, the trajectory map rendered again when any were)."""
    out = _copy(sample)
    drop = torch.as_tensor(list(dropped), dtype=torch.bool)
    if drop.shape != out["layer_validity"].shape:
        raise LayerkitError(f"got {drop.numel()} dropout flags for {out['layer_validity'].numel()} layers.")
    drop &= out["layer_validity"]
    if not drop.any():
        return out
    out["layer_validity"][drop] = False
    out["layer_static"][drop] = False
    out["layer_masks"][drop] = 0
    out["motion_scores"][drop] = NO_MOTION_SCORE
    out["sketch"][drop] = 1
    before = out["track_layer"].numel()
    _keep_tracks(out, ~drop)
    if out["track_layer"].numel() != before:  # a layer without tracks already has the "none" map
        out["trajectory"] = render_trajectory(out)
    return out


def keep_one_control(sample: dict[str, Any], controls: Sequence[str]) -> dict[str, Any]:
    """A copy where each valid layer keeps only ``controls[i]`` (one of ``CONTROLS``) and invalid
    layers keep none; the trajectory map is rendered again from the remaining tracks."""
    out = _copy(sample)
    controls = list(controls)
    n = out["layer_validity"].numel()
    if len(controls) != n or any(c not in CONTROLS for c in controls):
        raise LayerkitError(f"controls is {controls}; expected {n} of {', '.join(CONTROLS)}.")
    valid = out["layer_validity"]
    wants = {c: torch.tensor([x == c for x in controls]) & valid for c in CONTROLS}
    out["motion_scores"][~wants["motion_score"]] = NO_MOTION_SCORE
    out["sketch"][~wants["sketch"]] = 1
    before = out["track_layer"].numel()
    _keep_tracks(out, wants["trajectory"])
    if out["track_layer"].numel() != before:
        out["trajectory"] = render_trajectory(out)
    return out


def hflip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A horizontally mirrored copy: images, masks, sketches and maps flipped, offset x negated,
    track x -> W - 1 - x (also in ``ground_truth``)."""
    out = _copy(sample)
    width = out["video"].shape[-1]
    for key in ("video", "keyframes", "layer_masks", "sketch", "trajectory"):
        out[key] = out[key].flip(-1)
    out["trajectory"][:, :, 1] = -out["trajectory"][:, :, 1]
    out["tracks"][..., 0] = width - 1 - out["tracks"][..., 0]
    truth = out.get("ground_truth")
    if isinstance(truth, dict):
        if "layer_masks" in truth:
            truth["layer_masks"] = truth["layer_masks"].flip(-1)
        if "tracks" in truth:
            truth["tracks"][..., 0] = width - 1 - truth["tracks"][..., 0]
    return out


def apply_training_choices(sample: dict[str, Any], choices: TrainingChoices) -> dict[str, Any]:
    """Dropout, then one control per kept layer, then the flip; the sample must be in ``choices.mode``."""
    check_mode(choices.mode)
    if sample["mode"] != choices.mode:
        raise LayerkitError(f"the sample is in mode {sample['mode']} but the choices are for {choices.mode}; "
                            f"build the sample in the drawn mode.")
    out = keep_one_control(drop_layers(sample, choices.dropped), choices.controls)
    return hflip_sample(out) if choices.flip else out
