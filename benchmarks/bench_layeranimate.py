"""LayerAnimate (tiny ToonCrafter + Layer ControlNet + masked fusion): layerkit's loop against a
plain loop over the same model calls, on CPU.

layerkit: ``Sampler.run``'s denoising (``sampling.loop.denoise``: step construction, controls on
every guidance row, the adapters reading them through the backbone's context, CFG with rescale,
DDIM). Plain: the same calls written out (encode, conditions, per step the ControlNet on both
guidance rows, the UNet with the fusion reading its features, CFG + rescale, the scheduler step),
same latents; the max abs difference of the results is printed. Median of ``--repeats``; the
goal is a ratio of at most 1.05. A GPU run of the full-size model is in bench_tooncrafter.py.

Run: python benchmarks/bench_layeranimate.py [--repeats 5] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def plain_loop(parts: Any, packed: Any, steps: int, guidance: float, rescale: float) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    from layerkit.pipeline import encode_packed, make_step
    from layerkit.sampling.loop import rescale_noise_cfg

    backbone = parts.backbone
    control = next(iter(parts.controls.values()))
    scheduler = backbone.make_scheduler("sample")
    scheduler.set_timesteps(steps)
    given, _ = encode_packed(backbone, packed)
    cond = backbone.encode_conditions(packed, latents=given)
    uncond = backbone.negative_conditions(packed, cond, "")
    both = {k: torch.cat([uncond[k], v]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    generator = torch.Generator().manual_seed(0)  # the initial noise, then DDIM's eta noise, as denoise draws them
    x = randn_tensor(tuple(given.shape), generator=generator, dtype=given.dtype)
    for t in scheduler.timesteps:
        step = make_step(packed, torch.cat([x, x]), t.expand(2 * x.shape[0]), both, copies=2)
        features = control(step, backbone)
        with backbone.context.use(batch_size=step.rows, num_frames=x.shape[2], scales={}, controls=features,
                                  extras=step.extras):
            out = backbone.predict(step.noisy, step.timesteps, both)
        u, c = out.chunk(2)
        guided = rescale_noise_cfg(u + guidance * (c - u), c, rescale)
        x = backbone.scheduler_step(scheduler, guided, t, x, {}, generator)
    return x


def cpu(repeats: int, steps: int) -> None:
    from layerkit.config import compose
    from layerkit.pipeline import add_control_inputs
    from layerkit.registry import get_registry
    from layerkit.sampling.loop import SamplerOptions, denoise
    from layerkit.sampling.run import build_sampler

    registry = get_registry()
    cfg = compose("sample", ["+experiment=layeranimate", "backbone=tooncrafter_tiny", "sampler.progress=false"],
                  registry)
    sampler = build_sampler(cfg, registry)
    parts = sampler.parts
    batch = sampler.samples()
    packed = add_control_inputs(parts.task.pack(batch, training=False), batch, parts.controls)
    options = SamplerOptions(steps=steps, guidance_scale=7.5, guidance_rescale=0.7, scheduler="ddim", progress=False)

    def ours() -> torch.Tensor:
        return denoise(parts, packed, options, generator=torch.Generator().manual_seed(0)).latents

    def plain() -> torch.Tensor:
        return plain_loop(parts, packed, steps, 7.5, 0.7)

    with torch.no_grad():
        diff = (ours() - plain()).abs().max().item()
        times: dict[str, list[float]] = {"loop": [], "plain": []}
        for r in range(repeats):
            order = (("loop", ours), ("plain", plain))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    a, b = statistics.median(times["loop"]), statistics.median(times["plain"])
    print(f"CPU tiny ToonCrafter + Layer ControlNet (4 layers) + fusion, {steps} DDIM steps, CFG 7.5 + rescale 0.7, "
          f"threads {torch.get_num_threads()}: layerkit {a * 1e3:.1f} ms, plain loop {b * 1e3:.1f} ms, ratio "
          f"{a / b:.3f}, max abs diff {diff:.2e} (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu(args.repeats, args.steps)


if __name__ == "__main__":
    main()
