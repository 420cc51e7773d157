"""ToonCrafter (the ``tooncrafter`` backbone): one denoising step and peak memory.

CPU (always): the tiny model, layerkit's loop (``denoise``) against a hand-written DDIM/CFG loop over
the same backbone calls, same latents (max abs diff printed); median of the runs.

GPU (only with CUDA): the released architecture (UNet 1.44 B parameters, SD VAE, dual-reference
decoder, OpenCLIP ViT-H-14 text and vision towers, Resampler) with random weights in bf16, 16 frames
at 320 x 512 (latent 40 x 64), CFG batch 2: step time of a UNet call and peak GPU memory of one
sampling run (encode, 50 steps, decode), with everything resident and with the memory modes
(model CPU offload, VAE slicing, SDPA everywhere). The authors need 24 to 27 GB; the goal is under 12 GB.

Run: python benchmarks/bench_tooncrafter.py [--repeats 5] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch


def hand_loop(backbone: Any, packed: Any, steps: int, guidance: float, rescale: float) -> torch.Tensor:
    """DDIM with CFG and guidance rescale written out, calling the backbone directly."""
    from layerkit.pipeline import encode_packed
    from layerkit.sampling.loop import rescale_noise_cfg

    scheduler = backbone.make_scheduler("sample")
    scheduler.set_timesteps(steps)
    given, _ = encode_packed(backbone, packed)
    cond = backbone.encode_conditions(packed, latents=given)
    uncond = backbone.negative_conditions(packed, cond, "")
    both = {k: torch.cat([uncond[k], v]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    generator = torch.Generator().manual_seed(0)
    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor(tuple(given.shape), generator=generator, dtype=given.dtype)
    for t in scheduler.timesteps:
        out = backbone.predict(torch.cat([x, x]), t.expand(2 * x.shape[0]), both)
        u, c = out.chunk(2)
        guided = u + guidance * (c - u)
        guided = rescale_noise_cfg(guided, c, rescale)
        x = backbone.scheduler_step(scheduler, guided, t, x, {}, generator)
    return x


def cpu(repeats: int, steps: int) -> None:
    from layerkit_plugins.tooncrafter.backbone import tiny
    from layerkit_plugins.tooncrafter.task import KeyframeTask

    from layerkit.pipeline import Parts
    from layerkit.sampling.loop import SamplerOptions, denoise

    backbone = tiny(seed=0).eval()
    task = KeyframeTask(mode="interpolate")
    packed = task.pack({"video": torch.rand(1, 4, 3, 32, 32), "prompt": ["a red circle"]}, training=False)
    options = SamplerOptions(steps=steps, guidance_scale=7.5, guidance_rescale=0.7, progress=False)
    parts = Parts(backbone, task)

    def ours() -> torch.Tensor:
        return denoise(parts, packed, options, generator=torch.Generator().manual_seed(0)).latents

    def theirs() -> torch.Tensor:
        return hand_loop(backbone, packed, steps, 7.5, 0.7)

    with torch.no_grad():
        diff = (ours() - theirs()).abs().max().item()
        times: dict[str, list[float]] = {"loop": [], "hand": []}
        for r in range(repeats):
            order = (("loop", ours), ("hand", theirs))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    a, b = statistics.median(times["loop"]), statistics.median(times["hand"])
    print(f"CPU tiny ToonCrafter, interpolation, {steps} DDIM steps, CFG 7.5 + rescale 0.7, threads "
          f"{torch.get_num_threads()}: layerkit {a * 1e3:.1f} ms, hand loop {b * 1e3:.1f} ms, ratio {a / b:.3f}, "
          f"max abs diff {diff:.2e} (median of {repeats})")


def gpu(steps: int) -> None:
    if not torch.cuda.is_available():
        print("GPU: skipped (no CUDA device)")
        return
    from layerkit_plugins.tooncrafter.backbone import SCHEDULER_CONFIG, ToonCrafter
    from layerkit_plugins.tooncrafter.encoders import (
        image_encoder_from_openclip,
        random_openclip_state,
        text_encoder_from_openclip,
        tiny_tokenizer,
    )
    from layerkit_plugins.tooncrafter.resampler import Resampler
    from layerkit_plugins.tooncrafter.task import KeyframeTask
    from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet
    from layerkit_plugins.tooncrafter.vae import DualRefAutoencoderKL, build_sd_vae

    from layerkit.pipeline import Parts
    from layerkit.sampling.loop import SamplerOptions, denoise

    device = torch.device("cuda")
    dtype = torch.bfloat16
    state = random_openclip_state({"width": 1024, "layers": 24, "heads": 16, "vocab_size": 49408}, {
        "width": 1280, "layers": 32, "heads": 16, "patch_size": 14, "image_size": 224, "mlp_ratio": 4.0}, 1024)
    parts = {"unet": ToonCrafterUNet(), "image_projector": Resampler(), "vae": build_sd_vae(),
             "vae_dualref": DualRefAutoencoderKL(), "text_encoder": text_encoder_from_openclip(state, heads=16),
             "image_encoder": image_encoder_from_openclip(state, heads=16), "tokenizer": tiny_tokenizer(),
             "scheduler_config": dict(SCHEDULER_CONFIG)}
    for mode, memory in (("resident", {}), ("offload + VAE slicing", {"cpu_offload": True, "vae_slicing": True})):
        backbone = ToonCrafter.from_components(parts).to(dtype=dtype).eval()
        if memory:
            backbone.enable_memory_options(memory, device)
        else:
            backbone.to(device)
        task = KeyframeTask(mode="interpolate")
        packed = task.pack({"video": torch.rand(1, 16, 3, 320, 512), "prompt": ["a girl turning"]}, training=False)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            denoise(Parts(backbone, task), packed, SamplerOptions(steps=steps, guidance_scale=7.5, guidance_rescale=0.7,
                                                                  progress=False), generator=torch.Generator().manual_seed(0))
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        print(f"GPU {torch.cuda.get_device_name()} {mode}: {seconds * 1e3:.0f} ms per step (CFG batch 2), "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        del backbone
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu(args.repeats, args.steps)
    gpu(args.steps)


if __name__ == "__main__":
    main()
