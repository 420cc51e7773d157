"""``layerkit sample`` in three steps that evaluators and tools reuse:

- :func:`build_sampler`: compose-time config -> parts built, earlier stages' and trained weights
  loaded, placed on the device with the run's dtype and memory options;
- :meth:`Sampler.run`: inputs -> samples (task, controls' ``prepare``, collate, sampling
  stages) -> the one denoising loop -> decoded layers (and shapes-world metrics);
- :func:`write_outputs`: layers as video files (RGBA where transparent), a preview sheet and
  ``record.json``, staged and moved into place only when complete.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from layerkit.config import compose, params, to_plain
from layerkit.data.evaluate import summarise
from layerkit.errors import LayerkitError
from layerkit.protocols import Task, dtype_of
from layerkit.registry import Registry, get_registry
from layerkit.runs import check_output_dir, default_output_dir, list_files, staged_output_dir, write_record


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


def sampler_options(cfg: DictConfig) -> Any:
    from layerkit.sampling.loop import SamplerOptions

    s = cfg.sampler
    return SamplerOptions(
        steps=int(s.steps), guidance_scale=float(s.guidance_scale), guidance_rescale=float(s.guidance_rescale),
        dynamic_cfg=bool(s.dynamic_cfg),
        guidance_interval=tuple(float(x) for x in s.guidance_interval) if s.get("guidance_interval") is not None else None,
        scheduler=s.get("scheduler"), negative_prompt=str(s.negative_prompt),
        progress=bool(s.get("progress", True)),
    )


@dataclass
class SampleResult:
    """One run's outputs: per sample, layer name -> [F, C, H, W] in [0, 1]; the collated batch;
    shapes-world metrics (None for a user's inputs), their means and per sample; the denoised
    latents and timing."""

    outputs: list[dict[str, torch.Tensor]]
    batch: dict[str, Any]
    metrics: dict[str, float] | None
    denoised: Any
    seconds: float
    notes: list[str] = field(default_factory=list)
    per_sample: list[dict[str, float]] | None = None


@dataclass
class Sampler:
    cfg: DictConfig
    parts: Any
    container: nn.Module
    device: torch.device
    dtype: torch.dtype
    options: Any

    def size(self) -> tuple[int, int, int]:
        """(frames, height, width): ``sampler.*``, or the backbone's native size where those are null."""
        s = self.cfg.sampler
        native = self.parts.backbone.native_size
        values = []
        for i, key in enumerate(("num_frames", "height", "width")):
            value = s.get(key)
            if value is None:
                if native is None:
                    raise LayerkitError(f"sampler.{key} is null and backbone '{self.cfg.backbone.name}' has no native "
                                        f"size; set sampler.{key}.")
                value = native[i]
            values.append(int(value))
        return values[0], values[1], values[2]

    def samples(self, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Task inputs -> the collated batch (controls' ``prepare`` applied, stages run)."""
        from layerkit.checks import check_input_keys

        inputs = params(self.cfg.inputs) if inputs is None else dict(inputs)
        task = self.parts.task
        check_input_keys(task, inputs)
        frames, height, width = self.size()
        samples = task.sample_inputs(inputs, height=height, width=width, num_frames=frames)
        for control in self.parts.controls.values():
            samples = [control.prepare(sample) for sample in samples]
        batch = task.collate(samples)
        generator = torch.Generator("cpu").manual_seed(int(self.cfg.seed))
        for stage in self.parts.stages.values():
            batch = stage.run(self.parts, batch, device=self.device, dtype=self.dtype, generator=generator,
                              progress=self.options.progress)
        return batch

    @torch.no_grad()
    def run(self, batch: dict[str, Any] | None = None, *, generator: torch.Generator | None = None,
            callback: Any = None) -> SampleResult:
        """Denoise and decode ``batch`` (default: the config's inputs)."""
        from layerkit.pipeline import add_control_inputs, decode_packed
        from layerkit.sampling.loop import denoise

        started = time.perf_counter()
        batch = self.samples() if batch is None else batch
        parts = self.parts
        packed = add_control_inputs(parts.task.pack(batch, training=False), batch, parts.controls)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(self.cfg.seed))
        denoised = denoise(parts, packed, self.options, generator=generator, callback=callback)
        decoded = {k: v.float().cpu() for k, v in decode_packed(parts.backbone, denoised.latents, packed,
                                                                denoised.layout).items()}
        outputs = parts.task.unpack(decoded, batch)
        per_sample = parts.task.evaluate_samples(outputs, batch)
        default = per_sample and type(parts.task).evaluate is Task.evaluate  # their mean: not computed twice
        metrics = summarise(per_sample) if default else parts.task.evaluate(outputs, batch)
        notes = list(dict.fromkeys(n for row in batch.get("notes") or [] for n in (row or [])))
        return SampleResult(outputs, batch, metrics, denoised, time.perf_counter() - started, notes, per_sample)


def build_sampler(cfg: DictConfig, registry: Registry | None = None) -> Sampler:
    """Parts from the composed config, with ``init_from`` (earlier stages) and ``weights`` (the
    trained file) loaded, on the config's device, dtype and memory options."""
    from layerkit.pipeline import build_parts, load_trainable_state, weight_files

    registry = registry or get_registry()
    dtype = dtype_of(cfg.dtype)
    device = resolve_device(str(cfg.device))
    parts = build_parts(cfg, registry, training=False)
    container = Container(parts)
    allow_pickle = bool(cfg.get("allow_pickle", False))
    for path in [*weight_files(cfg.get("init_from")), *weight_files(cfg.get("weights"))]:
        load_trainable_state(container, path, parts=parts, allow_pickle=allow_pickle)
    container.eval().to(dtype=dtype)
    memory = {k: bool(v) for k, v in params(cfg.memory).items()}
    if memory.get("cpu_offload"):
        parts.backbone.enable_memory_options(memory, device)
        _move_own_modules(parts, device)
    else:
        container.to(device)
        parts.backbone.enable_memory_options(memory, device)
    return Sampler(cfg, parts, container, device, dtype, sampler_options(cfg))


def per_sample_records(result: SampleResult) -> list[dict[str, Any]]:
    """Each sample's figures with the folder it was written to and its prompt (when it had one)."""
    prompts = result.batch.get("prompt")
    rows = []
    for i, row in enumerate(result.per_sample or []):
        entry: dict[str, Any] = {"output": "." if len(result.outputs) == 1 else f"sample_{i:02d}"}
        if isinstance(prompts, list | tuple) and i < len(prompts):
            entry["prompt"] = str(prompts[i])
        rows.append({**entry, **{k: (None if v is None or math.isnan(float(v)) else float(v)) for k, v in row.items()}})
    return rows


def write_outputs(result: SampleResult, output_dir: Path, cfg: DictConfig) -> Path:
    """Each sample's layers as videos, a preview sheet, and the run's ``record.json``."""
    from layerkit.io.preview import write_preview_sheet
    from layerkit.io.video import write_layers

    overwrite = bool(cfg.get("overwrite", False))
    with staged_output_dir(output_dir, overwrite=overwrite) as stage:
        for i, layers in enumerate(result.outputs):
            sub = stage if len(result.outputs) == 1 else stage / f"sample_{i:02d}"
            frames = {name: to_frames(video) for name, video in layers.items()}
            write_layers(sub, frames, fps=float(cfg.fps), rgba_format=str(cfg.rgba_format))
            write_preview_sheet(sub / "preview.png", frames)
        extra = {"seconds": round(result.seconds, 3), "metrics": result.metrics}
        if result.per_sample:
            extra["metrics_per_sample"] = per_sample_records(result)
        if result.notes:
            extra["inputs"] = result.notes
        if result.denoised is not None and result.denoised.interrupted:
            extra["interrupted"] = True
        write_record(stage, command="sample", config=to_plain(cfg), seed=int(cfg.seed), files=list_files(stage),
                     final_dir=output_dir, extra=extra)
    return output_dir


def check_memory(cfg: DictConfig, device: torch.device) -> None:
    """Refuse, before any model loads, a size that cannot fit in the device's free memory
    (:func:`layerkit.checks.memory_estimate`)."""
    from layerkit import checks

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else checks.available_ram()
    checks.check_memory(cfg, device.type, free)


def sample(overrides: Sequence[str], *, registry: Registry | None = None, cfg: DictConfig | None = None) -> Path:
    """Run one sampling job; returns the output directory."""

    from layerkit.checks import apply_threads, check_config, check_inputs

    registry = registry or get_registry()
    if cfg is None:
        cfg = compose("sample", overrides, registry)
        check_config("sample", cfg)
    output_dir = Path(cfg.output_dir) if cfg.get("output_dir") else default_output_dir("sample")
    check_output_dir(output_dir, overwrite=bool(cfg.overwrite))
    dtype_of(cfg.dtype)
    apply_threads(cfg.get("threads", "auto"))
    check_inputs(cfg, registry)  # again, for callers that come here without the CLI
    check_memory(cfg, resolve_device(str(cfg.device)))
    sampler = build_sampler(cfg, registry)
    result = sampler.run()
    return write_outputs(result, output_dir, cfg)
