"""The one denoising loop: diffusers schedulers, classifier-free guidance (with guidance
rescale, CogVideoX-style dynamic CFG and a guidance interval), given frames re-imposed at every step, a per-step
callback for progress, previews and interruption."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from layerkit.errors import LayerkitError
from layerkit.pipeline import Layout, Parts, encode_packed, frame_mask, make_step, predict, reimposed
from layerkit.protocols import Packed

#: ``callback(step_index, num_steps, t, latents)``; returning True stops the loop after that step
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], bool | None]


@dataclass
class SamplerOptions:
    steps: int = 25
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    dynamic_cfg: bool = False
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    negative_prompt: str = ""
    progress: bool = True


@dataclass
class Denoised:
    """What the loop returns: latents [B, C, f, h, w], their layout (latent frames per segment,
    given frames) and whether a callback stopped the loop early."""

    latents: torch.Tensor
    layout: Layout
    interrupted: bool = False

    @property
    def lengths(self) -> list[int]:
        return self.layout.lengths


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the std of the text-conditioned output
    (diffusers' ``rescale_noise_cfg``; a row whose guided output has zero std, e.g. an untrained
    zero-initialised model, is left as it is instead of becoming NaN)."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    factor = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(torch.finfo(guided.dtype).tiny),
                         torch.ones_like(std_guided))
    return guidance_rescale * (guided * factor) + (1 - guidance_rescale) * guided


def guided_at(t: torch.Tensor, interval: tuple[float, float] | None) -> bool:
    """Whether classifier-free guidance applies at timestep ``t``: everywhere without an interval,
    else for ``low <= t <= high`` (Kynkaenniemi et al. 2024, "Applying guidance in a limited
    interval improves sample and distribution quality": guidance at the highest noise levels
    costs variety, at the lowest it only sharpens detail; elsewhere the conditional prediction
    alone, one denoiser call instead of two)."""
    return interval is None or interval[0] <= float(t) <= interval[1]


def dynamic_guidance(scale: float, t: torch.Tensor, steps: int) -> float:
    """CogVideoX's cosine ramp of the guidance scale over the timesteps."""
    return 1 + scale * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)


@torch.no_grad()
def denoise(
    parts: Parts,
    packed: Packed,
    options: SamplerOptions,
    *,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
    negative_cond: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
) -> Denoised:
    """Sample latents for ``packed``; given frames stay clean throughout.

    ``cond``/``negative_cond`` may be passed pre-computed (the equivalence tests feed the
    same prompt embeddings as the reference pipeline); otherwise the backbone encodes them
    (:meth:`Backbone.encode_conditions`, :meth:`Backbone.negative_conditions`).
    """
    backbone = parts.backbone
    scheduler = backbone.make_scheduler("sample", options.scheduler)
    device = backbone.execution_device
    given_latents, layout = encode_packed(backbone, packed)
    keep = frame_mask(reimposed(backbone, layout), given_latents)

    b = packed.batch_size
    if cond is None:
        cond = backbone.encode_conditions(packed, latents=given_latents)
    do_cfg = options.guidance_scale > 1.0
    positive = cond
    if do_cfg:
        if negative_cond is None:
            negative_cond = backbone.negative_conditions(packed, cond, options.negative_prompt, latents=given_latents)
        cond = stack_conditions(negative_cond, cond, b)

    scheduler.set_timesteps(options.steps, device=device)
    timesteps = scheduler.timesteps
    latents = backbone.prepare_noise(tuple(given_latents.shape), generator, device, given_latents.dtype)
    latents = latents * scheduler.init_noise_sigma
    state: dict[str, Any] = {"step": 0, "timesteps": timesteps}
    interrupted = False
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not options.progress, leave=False)):
        state["step"] = i
        latents = torch.where(keep, given_latents, latents)
        guided = do_cfg and guided_at(t, options.guidance_interval)
        copies = 2 if guided else 1
        model_input = torch.cat([latents] * copies) if copies > 1 else latents
        model_input = scheduler.scale_model_input(model_input, t)
        t_batch = t.expand(model_input.shape[0]) if t.dim() == 0 else t
        step = make_step(packed, model_input, t_batch, cond if guided else positive, copies)
        output = predict(parts, packed, step).to(latents.dtype)
        if guided:
            uncond, text = output.chunk(2)
            scale = dynamic_guidance(options.guidance_scale, t, options.steps) if options.dynamic_cfg else options.guidance_scale
            output = uncond + scale * (text - uncond)
            if options.guidance_rescale > 0:
                output = rescale_noise_cfg(output, text, options.guidance_rescale)
        latents = backbone.scheduler_step(scheduler, output, t, latents, state, generator)
        if callback is not None and callback(i, len(timesteps), t, torch.where(keep, given_latents, latents)):
            interrupted = True
            break
    return Denoised(torch.where(keep, given_latents, latents), layout, interrupted)


def stack_conditions(negative: dict[str, Any], positive: dict[str, Any], rows: int) -> dict[str, Any]:
    """``[uncond; cond]`` for every per-sample tensor of the conditioning (leading dim B)."""
    out: dict[str, Any] = {}
    for key, value in positive.items():
        other = negative.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            if not isinstance(other, torch.Tensor) or other.shape != value.shape:
                raise LayerkitError(f"the unconditional '{key}' does not match the conditional one's shape.")
            out[key] = torch.cat([other, value.to(other.dtype)])
        else:
            out[key] = value
    return out
