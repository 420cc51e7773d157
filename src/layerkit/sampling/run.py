"""``layerkit sample``: compose, build, load trained weights, denoise, decode, write files."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layerkit.config import compose, params, to_plain
from layerkit.errors import LayerkitError
from layerkit.registry import Registry, get_registry
from layerkit.runs import check_output_dir, default_output_dir, list_files, staged_output_dir, write_record

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class Container(nn.Module):
    """Names weights exactly as the training module does (backbone., controls., adapters.)."""

    def __init__(self, parts: Any) -> None:
        super().__init__()
        self.backbone = parts.backbone
        self.controls = nn.ModuleDict(parts.controls)
        self.adapters = nn.ModuleDict(parts.adapters)


def _move_own_modules(parts: Any, device: torch.device) -> None:
    """Under model CPU offload the backbone's components move on use; controls and adapters with
    weights of their own (a layer embedding, a ControlNet) go to the device once. Adapters whose
    weights live inside the backbone (LoRA) move with it."""
    backbone_params = {id(p) for p in parts.backbone.parameters()}
    for module in [*parts.controls.values(), *parts.adapters.values()]:
        own = list(module.parameters())
        if own and not any(id(p) in backbone_params for p in own):
            module.to(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LayerkitError(f"device '{name}' was asked for but CUDA is not available on this machine.")
    return torch.device(name)


def to_frames(video: torch.Tensor) -> np.ndarray:
    """[F, C, H, W] in [0, 1] -> uint8 [F, H, W, C'] with a 1-channel matte shown as grey RGB."""
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    return (video.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)


def sample(overrides: Sequence[str], *, registry: Registry | None = None) -> Path:
    """Run one sampling job; returns the output directory."""
    from layerkit.io.preview import write_preview_sheet
    from layerkit.io.video import write_layers
    from layerkit.pipeline import add_control_inputs, build_parts, load_trainable_state
    from layerkit.sampling.loop import SamplerOptions, denoise, split_segments
    from layerkit.training.data import default_collate

    registry = registry or get_registry()
    cfg = compose("sample", overrides, registry)
    output_dir = Path(cfg.output_dir) if cfg.get("output_dir") else default_output_dir("sample")
    check_output_dir(output_dir, overwrite=bool(cfg.overwrite))
    s = cfg.sampler
    if cfg.dtype not in DTYPES:
        raise LayerkitError(f"dtype '{cfg.dtype}' is not one of {sorted(DTYPES)}.")
    device = resolve_device(str(cfg.device))

    started = time.perf_counter()
    parts = build_parts(cfg, registry, training=False)
    container = Container(parts)
    if cfg.get("weights"):
        load_trainable_state(container, cfg.weights, allow_pickle=bool(cfg.get("allow_pickle", False)))
    samples = parts.task.sample_inputs(
        params(cfg.inputs), height=int(s.height), width=int(s.width), num_frames=int(s.num_frames)
    )
    for control in parts.controls.values():
        samples = [control.prepare(sample) for sample in samples]
    batch = default_collate(samples)
    packed = add_control_inputs(parts.task.pack(batch, training=False), batch, parts.controls)
    container.eval().to(dtype=DTYPES[cfg.dtype])
    memory = {k: bool(v) for k, v in params(cfg.memory).items()}
    if memory.get("cpu_offload"):
        parts.backbone.enable_memory_options(memory, device)
        _move_own_modules(parts, device)
    else:
        container.to(device)
        parts.backbone.enable_memory_options(memory, device)
    generator = torch.Generator("cpu").manual_seed(int(cfg.seed))
    options = SamplerOptions(
        steps=int(s.steps), guidance_scale=float(s.guidance_scale), guidance_rescale=float(s.guidance_rescale),
        dynamic_cfg=bool(s.dynamic_cfg), scheduler=s.get("scheduler"), negative_prompt=str(s.negative_prompt),
        progress=bool(s.get("progress", True)),
    )
    latents = denoise(parts, packed, options, generator=generator)
    lengths = [parts.backbone.latent_frames(seg.num_frames) for seg in packed.segments]
    with torch.no_grad():
        decoded = {k: parts.backbone.decode_latents(v).float().cpu()
                   for k, v in split_segments(latents, packed, lengths).items()}
    outputs = parts.task.unpack(decoded, batch)
    metrics = parts.task.evaluate(outputs, batch) if hasattr(parts.task, "evaluate") else None
    elapsed = time.perf_counter() - started

    with staged_output_dir(output_dir, overwrite=bool(cfg.overwrite)) as stage:
        for i, layers in enumerate(outputs):
            sub = stage if len(outputs) == 1 else stage / f"sample_{i:02d}"
            frames = {name: to_frames(video) for name, video in layers.items()}
            write_layers(sub, frames, fps=float(cfg.fps), rgba_format=str(cfg.rgba_format))
            write_preview_sheet(sub / "preview.png", frames)
        write_record(
            stage, command="sample", config=to_plain(cfg), seed=int(cfg.seed), files=list_files(stage),
            final_dir=output_dir,
            extra={"seconds": round(elapsed, 3), "device": str(device), "metrics": metrics},
        )
    return output_dir
