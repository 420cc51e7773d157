"""The steps training and sampling share: build the parts, encode a packed batch, map what is
given to latent frames, run the controls, call the denoiser inside the step context.
One ``pack``, one ``predict``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from layerkit.config import params
from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone, Control, Packed, Stage, Step, Task, repeat_rows
from layerkit.registry import Registry


@dataclass
class Parts:
    backbone: Backbone
    task: Task
    controls: dict[str, Control] = field(default_factory=dict)
    adapters: dict[str, Adapter] = field(default_factory=dict)
    #: sampling stages run before the loop, in order
    stages: dict[str, Stage] = field(default_factory=dict)
    #: adapters built but not attached (``inference: false`` at sampling): their weights are skipped on load
    dormant: dict[str, Adapter] = field(default_factory=dict)


def build_parts(cfg: DictConfig, registry: Registry, *, training: bool) -> Parts:
    """Backbone, task, controls, adapters (attached) and, for sampling, stages from a composed
    config; the wiring between controls and adapters is checked."""
    backbone = registry.build("backbone", cfg.backbone.name, **params(cfg.backbone))
    if not isinstance(backbone, Backbone):
        raise LayerkitError(f"backbone '{cfg.backbone.name}' did not build a layerkit Backbone.")
    task = registry.build("task", cfg.task.name, **params(cfg.task))
    controls: dict[str, Control] = {}
    for key, node in (cfg.get("controls") or {}).items():
        if node is not None:
            control = registry.build("control", node.name, backbone=backbone, **params(node))
            control.name = key
            controls[key] = control
    check_wiring_controls(controls)
    backbone.set_trainable(list(cfg.get("trainable") or []) if training else [])
    adapters: dict[str, Adapter] = {}
    dormant: dict[str, Adapter] = {}
    for key, node in (cfg.get("adapters") or {}).items():
        if node is None:
            continue
        kwargs = params(node)
        keep = training or kwargs.get("inference", True) is not False  # e.g. LayerFlow's Motion LoRA
        kwargs.pop("inference", None)
        adapter = registry.build("adapter", node.name, **kwargs)
        adapter.name = key
        if keep:
            adapters[key] = adapter
        else:
            dormant[key] = adapter
    check_wiring(controls, adapters)
    for adapter in adapters.values():
        adapter.attach(backbone)
    stages: dict[str, Stage] = {}
    if not training:
        for key, node in (cfg.get("stages") or {}).items():
            if node is not None:
                stage = registry.build("stage", node.name, **params(node))
                stage.name = key
                stages[key] = stage
    return Parts(backbone, task, controls, adapters, stages, dormant)


def check_wiring_controls(controls: dict[str, Control]) -> dict[str, str]:
    """Each published name comes from one control; returns name -> control key."""
    provided: dict[str, str] = {}
    for key, control in controls.items():
        for name in control.provides:
            if name in provided:
                raise LayerkitError(f"controls '{provided[name]}' and '{key}' both provide '{name}'; keep one of them.")
            provided[name] = key
    return provided


def check_wiring(controls: dict[str, Control], adapters: dict[str, Adapter]) -> None:
    """An adapter that reads what no control provides would silently do nothing: refuse it."""
    provided = check_wiring_controls(controls)
    for key, adapter in adapters.items():
        missing = [name for name in adapter.reads if name not in provided]
        if missing:
            have = ", ".join(f"'{n}' ({c})" for n, c in provided.items()) or "nothing"
            raise LayerkitError(
                f"adapter '{key}' reads {', '.join(repr(m) for m in missing)}, which no control provides; "
                f"the controls provide {have}."
            )


def add_control_inputs(packed: Packed, batch: dict[str, Any], controls: dict[str, Control]) -> Packed:
    """Copy the batch keys each control reads into ``packed.extras``."""
    for name, control in controls.items():
        for key in control.inputs:
            if key not in batch:
                raise LayerkitError(f"control '{name}' needs '{key}' in the batch; the dataset or task does not provide it.")
            packed.extras[key] = batch[key]
    return packed


def trainable_names(root: nn.Module) -> list[str]:
    return [n for n, p in root.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------
# latent layout: segments and given frames in latent time
# ----------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where each segment and each given frame sits in latent time.

    windows: the pixel frames [start, stop) behind each latent frame of the packed clip;
    lengths: latent frames per segment; given: [B, f] latent frames whose every pixel frame
    is given.
    """

    windows: list[tuple[int, int]]
    lengths: list[int]
    given: torch.Tensor


def latent_layout(backbone: Backbone, packed: Packed) -> Layout:
    """Map the segments and the per-frame given mask [B, F] to latent frames.

    With ``vae_pass="clip"`` the windows come from the whole clip, else from each segment.
    A latent frame is given when all its pixel frames are; one that mixes given and generated
    frames cannot be expressed (the temporal compression groups them) and is an error.
    """
    frames = packed.segment_frames()
    if backbone.vae_pass == "clip":
        windows = backbone.frame_windows(sum(frames))
    else:
        windows, start = [], 0
        for n in frames:
            windows += [(start + a, start + b) for a, b in backbone.frame_windows(n)]
            start += n
    bounds, start = [], 0
    for n in frames:
        bounds.append((start, start + n))
        start += n
    lengths = [0] * len(frames)
    for a, b in windows:
        owner = [i for i, (s, e) in enumerate(bounds) if s <= a and b <= e]
        if not owner:
            names = [s.name for s in packed.segments]
            raise LayerkitError(
                f"the backbone's temporal compression groups frames {a}..{b - 1} into one latent frame across the "
                f"segments {names} of {frames} frames; give each segment a frame count the compression divides."
            )
        lengths[owner[0]] += 1
    given = packed.given
    rows = []
    for a, b in windows:
        window = given[:, a:b]
        mixed = window.any(dim=1) & ~window.all(dim=1)
        if bool(mixed.any()):
            raise LayerkitError(
                f"frames {a}..{b - 1} share one latent frame of this backbone, so frame(s) "
                f"{[a + int(i) for i in torch.nonzero(window[mixed.nonzero()[0, 0]]).flatten()]} cannot be given "
                f"without the others."
            )
        rows.append(window.all(dim=1))
    return Layout(windows, lengths, torch.stack(rows, dim=1))


def packed_video(packed: Packed, device: torch.device | None = None) -> torch.Tensor | None:
    """The segments' videos concatenated in time [B, F, C, H, W] (zeros where a segment has no
    video), or None when no segment has one."""
    videos = [s.video for s in packed.segments]
    ref = next((v for v in videos if v is not None), None)
    if ref is None:
        return None
    out = []
    for seg, video in zip(packed.segments, videos, strict=True):
        if video is None:
            video = ref.new_zeros(ref.shape[0], seg.num_frames, *ref.shape[2:])
        elif video.shape[1] != seg.num_frames:
            raise LayerkitError(f"segment '{seg.name}' has {video.shape[1]} frames, expected {seg.num_frames}.")
        out.append(video)
    clip = torch.cat(out, dim=1)
    return clip.to(device) if device is not None else clip


def encode_packed(backbone: Backbone, packed: Packed, *, training: bool = False,
                  given_latents: str = "sampled",
                  encode_video: Callable[[torch.Tensor, tuple], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, Layout]:
    """Encode the packed clip: latents [B, C, f, h, w] and its :class:`Layout`.

    Training encodes every frame. At sampling only the given frames matter: with no given
    frame nothing is encoded (zeros), a backbone without temporal compression encodes just the
    given frames, any other encodes the clip with zeros where nothing is known.

    A VAE that sees the whole packed clip in one pass (``vae_pass = "clip"``) is causal in time:
    the latents of a given layer after the first carry the context of the frames before it. At
    sampling those frames are unknown (zeros), so training encodes the given latent frames the
    same way (``given_latents="sampled"``: the clip with the frames that are not given set to
    zero) and the model reads at sampling exactly what it was trained on; the other latent
    frames, the targets, come from the whole clip. ``given_latents="clip"`` takes them from the
    whole clip too (the released code's one pass). A given prefix (fg2bg's copy of frame 0,
    foreground and alpha) that the backbone encodes in one pass as alone
    (``Backbone.encodes_prefix_alone``) is the same both ways, and makes no pass of its own.

    ``encode_video(video, part)`` makes each VAE pass in place of ``backbone.encode_video(video)``;
    ``part`` names what the video is: ``("clip",)`` the whole packed clip, ``("given",)`` the clip
    with the frames not given set to zero, ``("segment", i)`` segment i alone. A latent cache
    (:class:`layerkit.training.cache.LatentCache`) keys its entries by it, so the modes of a task
    that pack a clip alike share its whole-clip pass.
    """
    if given_latents not in ("sampled", "clip"):
        raise LayerkitError(f"train.given_latents is '{given_latents}'; expected sampled or clip.")
    layout = latent_layout(backbone, packed)
    b, f = packed.batch_size, len(layout.windows)
    h, w = backbone.latent_size(packed.height, packed.width)
    device = backbone.execution_device
    param = next(backbone.parameters())
    zeros = torch.zeros(b, backbone.latent_channels, f, h, w, device=device, dtype=param.dtype)
    needed = layout.given.any(dim=0) if not training else torch.ones(f, dtype=torch.bool)
    if not bool(needed.any()):
        return zeros, layout
    video = packed_video(packed, device)
    if video is None:
        raise LayerkitError("the task marks frames as given but packed no video for them.")
    per_frame = all(bb - a == 1 for a, bb in layout.windows) and len(layout.windows) == video.shape[1]
    if per_frame and not bool(needed.all()):
        index = torch.nonzero(needed).flatten()
        latents = zeros.clone()
        latents[:, :, index.to(device)] = backbone.encode_video(video[:, index.to(video.device)]).to(zeros.dtype)
        return normalised(latents, packed, layout, frames=needed), layout  # frames not encoded stay zeros
    encode = encode_video or (lambda clip, part: backbone.encode_video(clip))
    if backbone.vae_pass == "clip":
        latents = encode(video, ("clip",))
        known = packed.given.to(video.device)
        if (training and given_latents == "sampled" and bool(layout.given.any()) and not bool(known.all())
                and not _given_prefix_alone(backbone, known)):
            as_sampled = encode(video * known[:, :, None, None, None].to(video.dtype), ("given",))
            latents = torch.where(frame_mask(layout.given, latents), as_sampled.to(latents.dtype), latents)
    else:
        chunks, start = [], 0
        for i, seg in enumerate(packed.segments):
            chunks.append(encode(video[:, start : start + seg.num_frames], ("segment", i)))
            start += seg.num_frames
        latents = torch.cat(chunks, dim=2)
    if latents.shape[2] != f:
        raise LayerkitError(f"the backbone encoded {video.shape[1]} frames into {latents.shape[2]} latent frames; "
                            f"its frame_windows promise {f}.")
    return normalised(latents, packed, layout), layout


def _given_prefix_alone(backbone: Backbone, known: torch.Tensor) -> bool:
    """Every sample's given frames are the same first p frames, and the backbone encodes such a
    prefix in one pass exactly as alone (fg2bg's copy of frame 0, foreground and matte)."""
    count = int(known[0].sum())
    prefix = torch.zeros_like(known[0])
    prefix[:count] = True
    return count > 0 and bool((known == prefix).all()) and backbone.encodes_prefix_alone(count, known.shape[1])


def normalised(latents: torch.Tensor, packed: Packed, layout: Layout, *, inverse: bool = False,
               frames: torch.Tensor | None = None) -> torch.Tensor:
    """The latents as they are diffused: each segment named in ``packed.latent_residual`` as its
    difference from its base segment's latents, then each segment named in ``packed.latent_norm``
    as (z - mean) / std per channel (``inverse``: back to the backbone's latents), in float32 and
    cast back; the others as they are. ``frames`` ([f] bool): only those latent frames (the others
    keep their values)."""
    residual = packed.latent_residual or {}
    if not packed.latent_norm and not residual:
        return latents
    spans, start = {}, 0
    for seg, length in zip(packed.segments, layout.lengths, strict=True):
        spans[seg.name] = (start, length)
        start += length
    for name, base in residual.items():
        if name not in spans or base not in spans:
            raise LayerkitError(f"the latent residual {name} - {base} names a segment this packed clip does not have; "
                                f"it has {list(spans)}.")
        if spans[name][1] != spans[base][1]:
            raise LayerkitError(f"the latent residual {name} - {base} needs segments of as many latent frames; they "
                                f"have {spans[name][1]} and {spans[base][1]}.")
    if not inverse:
        latents = _residuals(latents, spans, residual, frames, sign=-1.0)
    out = _segment_norms(latents, packed, spans, inverse, frames)
    return _residuals(out, spans, residual, frames, sign=1.0) if inverse else out


def _residuals(latents: torch.Tensor, spans: dict[str, tuple[int, int]], residual: dict[str, str],
               frames: torch.Tensor | None, sign: float) -> torch.Tensor:
    """Each residual segment's latents plus (``sign`` 1) or minus (-1) its base segment's."""
    if not residual:
        return latents
    out = latents.clone()
    for name, base in residual.items():
        (s, n), (b, _) = spans[name], spans[base]
        part = latents[:, :, s : s + n].float() + sign * latents[:, :, b : b + n].float()
        if frames is not None:
            keep = frames[s : s + n].to(latents.device).view(1, 1, -1, 1, 1)
            part = torch.where(keep, part, latents[:, :, s : s + n].float())
        out[:, :, s : s + n] = part.to(latents.dtype)
    return out


def _segment_norms(latents: torch.Tensor, packed: Packed, spans: dict[str, tuple[int, int]], inverse: bool,
                   frames: torch.Tensor | None) -> torch.Tensor:
    if not packed.latent_norm:
        return latents
    out = latents.clone()
    for name, (start, length) in spans.items():
        stats = packed.latent_norm.get(name)
        if stats is not None and length:
            mean, std = (torch.as_tensor(v, dtype=torch.float32, device=latents.device) for v in stats)
            if mean.numel() != latents.shape[1] or std.numel() != latents.shape[1]:
                raise LayerkitError(f"the latent normalisation of segment '{name}' has {mean.numel()} means and "
                                    f"{std.numel()} stds; the backbone's latents have {latents.shape[1]} channels.")
            mean, std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)
            part = latents[:, :, start : start + length].float()
            part = part * std + mean if inverse else (part - mean) / std
            if frames is not None:
                keep = frames[start : start + length].to(latents.device).view(1, 1, -1, 1, 1)
                part = torch.where(keep, part, latents[:, :, start : start + length].float())
            out[:, :, start : start + length] = part.to(latents.dtype)
    return out


def latent_norm_record(norm: dict[str, tuple[Any, Any]] | None) -> dict[str, dict[str, list[float]]]:
    """A task's latent normalisation as plain lists (what trained weights record), {} for none."""
    return {name: {"mean": [round(float(v), 6) for v in torch.as_tensor(mean).flatten()],
                   "std": [round(float(v), 6) for v in torch.as_tensor(std).flatten()]}
            for name, (mean, std) in sorted((norm or {}).items())}


def decode_packed(backbone: Backbone, latents: torch.Tensor, packed: Packed, layout: Layout) -> dict[str, torch.Tensor]:
    """Latents [B, C, f, h, w] -> segment name -> [B, F_s, C', H, W] in [-1, 1] (one decoder pass
    over the clip, or one per segment, as the backbone encodes)."""
    frames = packed.segment_frames()
    latents = normalised(latents, packed, layout, inverse=True)
    if backbone.vae_pass == "clip":
        video = backbone.decode_latents(latents)
        if video.shape[1] != sum(frames):
            raise LayerkitError(f"the backbone decoded {latents.shape[2]} latent frames into {video.shape[1]} frames, "
                                f"not the packed clip's {sum(frames)}.")
        chunks = torch.split(video, frames, dim=1)
    else:
        chunks = [backbone.decode_latents(z) for z in torch.split(latents, layout.lengths, dim=2)]
    return {seg.name: chunk for seg, chunk in zip(packed.segments, chunks, strict=True)}


def frame_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, f] -> broadcastable to latents [B, C, f, h, w]."""
    return mask[:, None, :, None, None].to(like.device)


def reimposed(backbone: Backbone, layout: Layout) -> torch.Tensor:
    """[B, f] latent frames kept clean every step and left out of the loss."""
    return layout.given if backbone.given_mode == "reimpose" else torch.zeros_like(layout.given)


# ----------------------------------------------------------------------------------------
# one denoiser call
# ----------------------------------------------------------------------------------------
def make_step(packed: Packed, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any],
              copies: int = 1) -> Step:
    """The denoiser call's inputs; the extras repeated for the guidance rows once per packed batch,
    so a control sees the same tensors at every step (and may keep what it derives from them)."""
    memo = packed.__dict__.setdefault("_extras_rows", {})
    if copies not in memo:
        memo[copies] = repeat_rows(packed.extras, copies, packed.batch_size)
    return Step(noisy, timesteps, cond, memo[copies], copies)


def run_controls(parts: Parts, step: Step) -> dict[str, Any]:
    """Every control on the call (or, guidance-independent ones, on the conditional rows and
    repeated); their outputs under the names they declare."""
    published: dict[str, Any] = {}
    for key, control in parts.controls.items():
        if control.guidance_independent and step.copies > 1:
            half = step.half(step.copies - 1)
            out = repeat_rows(control(half, parts.backbone), step.copies, half.rows)
        else:
            out = control(step, parts.backbone)
        out = dict(out or {})
        if set(out) != set(control.provides):
            raise LayerkitError(f"control '{key}' returned {sorted(out)} but declares it provides "
                                f"{sorted(control.provides)}.")
        published.update(out)
    return published


def predict(parts: Parts, packed: Packed, step: Step) -> torch.Tensor:
    """Run the controls, then the denoiser with adapters reading the step context."""
    b = packed.batch_size
    controls = run_controls(parts, step)
    scales = {k: v.to(step.noisy.device, step.noisy.dtype) for k, v in packed.scales.items()}
    with parts.backbone.context.use(batch_size=step.rows, num_frames=step.noisy.shape[2],
                                    scales=repeat_rows(scales, step.copies, b), controls=controls, extras=step.extras):
        return parts.backbone.predict(step.noisy, step.timesteps, step.cond)


# ----------------------------------------------------------------------------------------
# weights of earlier stages
# ----------------------------------------------------------------------------------------
def load_trainable_state(module: nn.Module, path: str | Path, *, parts: Parts | None = None,
                         allow_pickle: bool = False) -> list[str]:
    """Load trainable weights (a ``weights.safetensors`` of an earlier stage) into ``module``.

    Every key must exist in the model, or be placed by an attached adapter (:meth:`Adapter.map_key`:
    a LoRA-wrapped layer keeps its weight under another name), or belong to an adapter left out
    at sampling (skipped).
    """
    from layerkit.io.weights import load_weights

    state = load_weights(path, allow_pickle=allow_pickle)
    if parts is not None:
        check_latent_transform(path, parts.task)
    own = module.state_dict()
    attached = list(parts.adapters.values()) if parts else []
    dormant = list(parts.dormant.values()) if parts else []
    placed: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        target = key if key in own else next((m for a in attached if (m := a.map_key(key, own)) is not None), None)
        if target is not None and target in own:
            placed[target] = value
        elif not any(a.owns_key(key) for a in dormant):
            unexpected.append(key)
    if unexpected:
        raise LayerkitError(
            f"weights file '{path}' has {len(unexpected)} keys this model does not have "
            f"(first: {unexpected[0]}), so it was trained with another backbone or adapter set."
        )
    wrong = [k for k, v in placed.items() if tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise LayerkitError(
            f"weights file '{path}' holds {k} with shape {tuple(placed[k].shape)}, expected {tuple(own[k].shape)}."
        )
    module.load_state_dict(placed, strict=False)
    return list(placed)


def check_latent_transform(path: str | Path, task: Any) -> None:
    """Weights trained with a latent normalisation (``Task.latent_norm``, recorded in their metadata as
    ``layerkit_latent_norm``) or latent residuals (``Task.latent_residual``, ``layerkit_latent_residual``)
    load only into a task with the same: decoded the other way their latents would be wrong without
    any error."""
    from layerkit.io.weights import read_metadata

    if Path(path).suffix != ".safetensors":
        return
    metadata = read_metadata(path)
    trained = metadata.get("layerkit_latent_norm") or {}
    current = latent_norm_record(getattr(task, "latent_norm", None))
    same = set(trained) == set(current) and all(
        len(trained[k][s]) == len(current[k][s])
        and all(abs(float(a) - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(trained[k][s], current[k][s], strict=True))
        for k in current for s in ("mean", "std"))
    if not same:
        had = f"a latent normalisation of {sorted(trained)}" if trained else "no latent normalisation"
        now = f"one of {sorted(current)}" if current else "none"
        raise LayerkitError(f"weights file '{path}' was trained with {had}, but this run's task has {now}; set "
                            f"task.latent_norm as it was in training (the weights' run record has it).")
    trained_residual = metadata.get("layerkit_latent_residual") or {}
    current_residual = dict(getattr(task, "latent_residual", None) or {})
    if trained_residual != current_residual:
        def said(pairs: dict[str, str]) -> str:
            listed = ", ".join(f"{k} - {v}" for k, v in sorted(pairs.items()))
            return f"the latent residuals {listed}" if listed else "no latent residual"

        raise LayerkitError(f"weights file '{path}' was trained with {said(trained_residual)}, but this run's task "
                            f"has {said(current_residual)}; set task.latent_residual as it was in training (the "
                            f"weights' run record has it).")


def weight_files(value: Any) -> list[str]:
    """``init_from``/``weights`` as a list of paths (a path, a list, null entries dropped)."""
    if value in (None, ""):
        return []
    items = [value] if isinstance(value, str | Path) else list(value)
    return [str(v) for v in items if v not in (None, "", "None")]
