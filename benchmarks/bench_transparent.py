"""Transparent video (Layer-Animate) figures.

CPU: layerkit's sampler (``denoise`` with Inter-Frame Attention attached, zero-initialised W_O')
against diffusers' ``AnimateDiffPipeline(output_type="latent")`` on the tiny AnimateDiff, same
prompt, seed, scheduler and steps (the two give the same latents: tests/test_transparent.py).
Runs alternate between the two sides after warm-up; the figure is the ratio of the medians
(goal <= 1.05). Two more rows show what is behind it: layerkit with no adapter (the loop
alone) and with a non-zero W_O' (what trained Inter-Frame Attention costs).

GPU (only where CUDA is available, else "skipped"): an SD-1.5-shaped AnimateDiff UNet
(UNet2DConditionModel + MotionAdapter defaults, random weights) with Inter-Frame Attention
(random, non-zero W_O'),
16 frames of 512x512 (64x64 latents), fp16: one sampling step (classifier-free guidance,
batch 2) and one training step (batch 1, forward + backward into W_Q'/W_O'), time and peak
memory, with and without the adapter.

Run: python benchmarks/bench_transparent.py [--threads 2] [--runs 9] [--steps 10]
(figures go to docs/benchmarks.md by hand, with the machine)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu(args: argparse.Namespace) -> None:
    from diffusers import AnimateDiffPipeline
    from layerkit_plugins.animatediff.backbone import tiny
    from layerkit_plugins.transparent.inter_frame import InterFrameAttention
    from layerkit_plugins.transparent.task import TransparentTask

    from layerkit.pipeline import Parts
    from layerkit.sampling.loop import SamplerOptions, denoise

    torch.set_num_threads(args.threads)
    backbone = tiny(seed=0).eval()
    reference_unet = copy.deepcopy(backbone.denoiser)  # diffusers runs a UNet without layerkit's processors
    pipe = AnimateDiffPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                               unet=reference_unet, motion_adapter=None, scheduler=backbone.make_scheduler("sample"))
    pipe.set_progress_bar_config(disable=True)
    prompt, f, size = "a red circle moving right", args.frames, args.size
    task = TransparentTask(mode="t2v", given_reference=False)  # every frame from noise, as the pipeline
    packed = task.pack({"prompt": [prompt], "num_frames": f, "height": size, "width": size}, training=False)
    options = SamplerOptions(steps=args.steps, guidance_scale=7.5, progress=False)

    def diffusers_run() -> torch.Tensor:
        return pipe(prompt, num_frames=f, height=size, width=size, num_inference_steps=args.steps,
                    guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    def layerkit_run(adapters: dict) -> torch.Tensor:
        return denoise(Parts(backbone, task, adapters=adapters), packed, options,
                       generator=torch.Generator().manual_seed(0)).latents

    ifa = InterFrameAttention()
    ifa.name = "inter_frame"
    ifa.attach(backbone)
    zero = {"inter_frame": ifa}
    with torch.no_grad():
        same = (layerkit_run(zero) - diffusers_run()).abs().max().item()

    def compare(label: str, adapters: dict) -> None:
        for _ in range(args.warmup):
            layerkit_run(adapters)
            diffusers_run()
        ours, theirs = [], []
        for i in range(args.runs):  # alternate, so drifting load hits both sides alike
            if i % 2:
                theirs.append(_time(diffusers_run))
                ours.append(_time(lambda: layerkit_run(adapters)))
            else:
                ours.append(_time(lambda: layerkit_run(adapters)))
                theirs.append(_time(diffusers_run))
        a, b = statistics.median(ours), statistics.median(theirs)
        pairs = statistics.median(x / y for x, y in zip(ours, theirs, strict=True))
        print(f"| {label} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.3f} | {pairs:.3f} |")

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); tiny AnimateDiff, {f} frames {size}x{size}, {args.steps} DDIM steps, "
          f"CFG 7.5, median of {args.runs} alternating runs after {args.warmup} warm-up")
    print(f"max |layerkit - diffusers| latent difference (zero-init adapter): {same:.2e}")
    print("| layerkit run | layerkit | diffusers AnimateDiffPipeline | ratio of medians | median of paired ratios |")
    print("| --- | --- | --- | --- | --- |")
    with torch.no_grad():
        compare("Inter-Frame Attention, zero-init W_O'", zero)
        ifa.detach(backbone)
        compare("no adapter (loop alone)", {})
        ifa.attach(backbone)
        for layer in ifa.layers.values():
            layer["to_out"].weight.normal_(0, 0.02)
        compare("Inter-Frame Attention, trained-like W_O'", zero)


def unet_steps(unet: torch.nn.Module, *, frames: int, latent: int, text_dim: int, runs: int) -> list[str]:
    """Table rows: one sampling step (CFG batch 2) and one training step (batch 1) of ``unet``
    (a UNetMotionModel on its device and dtype), with Inter-Frame Attention and without."""
    from layerkit_plugins.transparent.inter_frame import InterFrameAttention

    from layerkit.protocols import Backbone

    class Bare(Backbone):
        def __init__(self, denoiser: torch.nn.Module) -> None:
            super().__init__()
            self.denoiser = denoiser

    param = next(unet.parameters())
    device, dtype, cuda = param.device, param.dtype, param.device.type == "cuda"
    bare = Bare(unet)
    ifa = InterFrameAttention()
    ifa.name = "inter_frame"
    ifa.attach(bare)
    ifa.to(device, dtype)
    with torch.no_grad():  # trained-like W_O': a zero one would be skipped at sampling
        for layer in ifa.layers.values():
            layer["to_out"].weight.normal_(0, 0.02)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(batch: int, train: bool, with_ifa: bool) -> tuple[float, float]:
        # both rows of a training step backpropagate to the input, so they do the same backward work
        x = torch.randn(batch, 4, frames, latent, latent, device=device, dtype=dtype, requires_grad=train)
        text = torch.randn(batch * frames, 77, text_dim, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device)
        ifa.scale = 1.0 if with_ifa else 0.0

        def once() -> None:
            with bare.context.use(batch_size=batch, num_frames=frames, extras={"reference_frame": (frames - 1) // 2}):
                if train:
                    out = unet(x, t, encoder_hidden_states=text).sample
                    out.float().pow(2).mean().backward()
                    ifa.zero_grad(set_to_none=True)
                    x.grad = None
                else:
                    with torch.no_grad():
                        unet(x, t, encoder_hidden_states=text)

        for _ in range(2):
            once()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(runs):
            sync()
            start = time.perf_counter()
            once()
            sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return statistics.median(times), peak

    rows = ["| step | with Inter-Frame Attention | without (adapter scale 0) |", "| --- | --- | --- |"]
    for label, batch, train in (("sampling, CFG batch 2", 2, False), ("training, batch 1", 1, True)):
        ifa.requires_grad_(train)
        a_t, a_m = step(batch, train, True)
        b_t, b_m = step(batch, train, False)
        rows.append(f"| {label} | {a_t * 1e3:.0f} ms, peak {a_m:.1f} GiB | {b_t * 1e3:.0f} ms, peak {b_m:.1f} GiB |")
    ifa.detach(bare)
    return rows


def gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("GPU part: skipped (CUDA is not available on this machine).")
        return
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    frames = 16
    torch.manual_seed(0)
    unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(cross_attention_dim=768), MotionAdapter())
    unet = unet.to("cuda", torch.float16).eval().requires_grad_(False)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; SD-1.5-shaped AnimateDiff UNet "
          f"({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, random weights) + Inter-Frame "
          f"Attention, {frames} x 512x512 (64x64 latents), fp16, median of {args.gpu_runs} after 2 warm-up")
    for row in unet_steps(unet, frames=frames, latent=64, text_dim=768, runs=args.gpu_runs):
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gpu-runs", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if not args.skip_cpu:
        cpu(args)
    gpu(args)


if __name__ == "__main__":
    main()
