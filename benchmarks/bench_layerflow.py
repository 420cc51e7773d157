"""LayerFlow on CogVideoX: layerkit's sampler against diffusers' CogVideoXPipeline, and the GPU cost of
one LayerFlow denoising step.

CPU (always): ``layerkit.sampling.loop.denoise`` on one clip, no adapters, against
``CogVideoXPipeline(output_type="latent")`` with the same weights, scheduler (CogVideoXDPMScheduler),
steps, CFG and prompt embeddings; warm-up first, then the two alternate and the median of the
runs is kept. Goal: layerkit / diffusers <= 1.05. Two sizes: the tiny test model (Python overhead
dominates) and a small one (hidden 256, 8 blocks, 13 frames at 96x96).

GPU (only with CUDA): a CogVideoX-2B-shaped transformer (hidden 1920, 30 blocks), VAE and T5-XXL
encoder with random weights in bf16; LayerFlow's packed sequence of 4 layers x F frames at
480x720 (16 frames -> 4 x 4 latent frames; 49 -> 4 x 13), 3 prompt blocks x 226 T5 tokens, CFG
batch 2. One denoising step (a transformer call) and peak GPU memory, with everything resident
and with model CPU offload (``memory.cpu_offload``: text encoder, transformer and VAE on the GPU
one at a time).

Run: python benchmarks/bench_layerflow.py [--repeats 7] [--steps 10] [--threads 1] [--gpu-frames 16 49]
     (figures go to docs/benchmarks.md by hand, with the machine)
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from typing import Any

import torch


# ----------------------------------------------------------------------------------------
# CPU: layerkit's loop vs CogVideoXPipeline
# ----------------------------------------------------------------------------------------
def small_parts() -> dict[str, Any]:
    """Tiny VAE / T5 / tokenizer with a wider transformer (hidden 256, 8 blocks, 96x96, 13 frames)."""
    from diffusers import CogVideoXTransformer3DModel
    from layerkit_plugins.cogvideox.backbone import tiny_components

    parts = tiny_components(seed=0, layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        parts["transformer"] = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
            text_embed_dim=32, num_layers=8, sample_width=12, sample_height=12, sample_frames=13, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16).eval()
    return parts


def cpu_case(name: str, parts: dict[str, Any] | None, size: int, frames: int, steps: int, repeats: int,
             dynamic_cfg: bool = True) -> dict[str, Any]:
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import Parts
    from layerkit.protocols import Packed, Segment
    from layerkit.sampling.loop import SamplerOptions, denoise

    backbone = CogVideoX(tiny=True)
    if parts is not None:
        backbone.setup(parts, max_text_tokens=16)
    backbone.eval()
    with torch.no_grad():
        prompt = backbone.encode_prompts(["2, a red circle moving left over blue and white stripes"])["prompt_embeds"]
        negative = backbone.encode_prompts([""])["prompt_embeds"]
    pipe = backbone.diffusers_pipeline()
    packed = Packed([Segment("video", frames)], torch.zeros(1, frames, dtype=torch.bool), [["unused"]], size, size)
    options = SamplerOptions(steps=steps, guidance_scale=6.0, dynamic_cfg=dynamic_cfg, progress=False)
    lk_parts = Parts(backbone, task=None)  # type: ignore[arg-type]

    def run_diffusers() -> torch.Tensor:
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=size, width=size, num_frames=frames,
                    num_inference_steps=steps, guidance_scale=6.0, use_dynamic_cfg=dynamic_cfg,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    def run_layerkit() -> torch.Tensor:
        return denoise(lk_parts, packed, options, generator=torch.Generator().manual_seed(0),
                       cond={"prompt_embeds": prompt}, negative_cond={"prompt_embeds": negative}).latents

    with torch.no_grad():
        diff = (run_layerkit().permute(0, 2, 1, 3, 4) - run_diffusers()).abs().max().item()  # warm-up + check
        times: dict[str, list[float]] = {"diffusers": [], "layerkit": []}
        for r in range(repeats):  # alternate, and swap the order every run (shared machine)
            order = (("diffusers", run_diffusers), ("layerkit", run_layerkit))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    d, lk = statistics.median(times["diffusers"]), statistics.median(times["layerkit"])
    return {"case": name, "steps": steps, "diffusers_ms": d * 1e3, "layerkit_ms": lk * 1e3, "ratio": lk / d,
            "max_abs_diff": diff}


def cpu_bench(steps: int, repeats: int) -> list[dict[str, Any]]:
    rows = [
        cpu_case("tiny (hidden 32, 12 blocks, 9 frames 32x32)", None, 32, 9, steps, repeats),
        cpu_case("small (hidden 256, 8 blocks, 13 frames 96x96)", small_parts(), 96, 13, steps, repeats),
    ]
    print(f"\nCPU: layerkit denoise vs CogVideoXPipeline(output_type='latent'), DPM, CFG 6 dynamic, "
          f"{steps} steps, median of {repeats} after a warm-up")
    print(f"{'case':50s} {'diffusers ms':>13s} {'layerkit ms':>12s} {'ratio':>7s} {'max |diff|':>11s}")
    for row in rows:
        print(f"{row['case']:50s} {row['diffusers_ms']:13.1f} {row['layerkit_ms']:12.1f} {row['ratio']:7.3f} "
              f"{row['max_abs_diff']:11.2g}")
    return rows


# ----------------------------------------------------------------------------------------
# GPU: one LayerFlow step at CogVideoX-2B size
# ----------------------------------------------------------------------------------------
#: CogVideoX-2B's transformer/config.json (and the VAE's and T5-XXL encoder's)
TRANSFORMER_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                      time_embed_dim=512, text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60,
                      sample_frames=49, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                      use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False,
                      spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0)
VAE_2B: dict[str, Any] = {}  # AutoencoderKLCogVideoX's defaults are CogVideoX-2B's VAE
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
              use_cache=False, dropout_rate=0.0)
LAYERFLOW = dict(layers=4, prompt_blocks=3, height=480, width=720)


def build_2b(device: torch.device, dtype: torch.dtype, spec: dict[str, Any]):
    """A layerkit CogVideoX backbone holding random-weight parts of the given shapes."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from layerkit_plugins.cogvideox.backbone import SCHEDULER_CONFIG, CogVideoX, tiny_tokenizer
    from transformers import T5Config, T5EncoderModel

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of 6.5B parameters
    try:
        with device:
            parts = {"transformer": CogVideoXTransformer3DModel(**spec["transformer"]),
                     "vae": AutoencoderKLCogVideoX(**spec["vae"]),
                     "text_encoder": T5EncoderModel(T5Config(**spec["t5"])),
                     "tokenizer": tiny_tokenizer(), "scheduler": CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)}
    finally:
        torch.set_default_dtype(saved)
    backbone = CogVideoX(tiny=True, tiny_layers=1)
    backbone.setup(parts, max_text_tokens=spec["transformer"]["max_text_seq_length"])
    return backbone.to(dtype).eval()


def gpu_case(device: torch.device, dtype: torch.dtype, spec: dict[str, Any], frames: int, offload: bool,
             repeats: int) -> dict[str, Any]:
    cuda = device.type == "cuda"
    home = torch.device("cpu") if offload else device
    backbone = build_2b(home, dtype, spec)
    if offload:
        backbone.enable_memory_options({"cpu_offload": True}, device)
    layers, blocks = spec["layerflow"]["layers"], spec["layerflow"]["prompt_blocks"]
    tokens = spec["transformer"]["max_text_seq_length"]
    f = backbone.latent_frames(frames) * layers
    h, w = backbone.latent_size(spec["layerflow"]["height"], spec["layerflow"]["width"])
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, spec["t5"]["vocab_size"], (2 * blocks, tokens), generator=g).to(device)
    noisy = torch.randn(2, backbone.latent_channels, f, h, w, generator=g).to(device, dtype)
    t = torch.tensor([999, 999], device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        start = time.perf_counter()
        text = backbone.text_encoder(ids)[0].to(dtype)  # [2*K, L, D] -> CFG batch of K blocks each
        sync()
        encode_s = time.perf_counter() - start
        cond = {"prompt_embeds": text.reshape(2, blocks * tokens, -1),
                "prompt_block_index": torch.arange(blocks, device=device).repeat_interleave(tokens)}
        step_times = []
        for _ in range(repeats + 1):  # the first call moves the transformer in (offload) and warms up
            start = time.perf_counter()
            out = backbone.predict(noisy, t, cond)
            sync()
            step_times.append(time.perf_counter() - start)
    assert out.shape == noisy.shape
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    row = {"frames": frames, "latent": f"{layers} x {f // layers} x {h}x{w}", "tokens": f * (h // 2) * (w // 2),
           "offload": offload, "encode_s": encode_s, "first_step_s": step_times[0],
           "step_s": statistics.median(step_times[1:]), "peak_gib": peak}
    del backbone, out, noisy, cond, text
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def gpu_bench(frames_list: list[int], repeats: int, smoke: bool = False) -> list[dict[str, Any]]:
    if smoke:  # the same code on CPU with toy shapes (checks the script, measures nothing)
        device, dtype = torch.device("cpu"), torch.float32
        spec = {"transformer": dict(TRANSFORMER_2B, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                    text_embed_dim=32, time_embed_dim=16, max_text_seq_length=8),
                "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2),
                "t5": dict(T5_XXL, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
                "layerflow": dict(LAYERFLOW, height=32, width=48)}
    elif not torch.cuda.is_available():
        print("\nGPU: skipped (CUDA is not available on this machine).")
        return []
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        spec = {"transformer": TRANSFORMER_2B, "vae": VAE_2B, "t5": T5_XXL, "layerflow": LAYERFLOW}
    rows = [gpu_case(device, dtype, spec, frames, offload, repeats) for frames in frames_list for offload in (False, True)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    lf, tokens = spec["layerflow"], spec["transformer"]["max_text_seq_length"]
    print(f"\nGPU: {name}; CogVideoX-2B-shaped transformer + VAE + T5-XXL encoder, random weights, {dtype}; "
          f"LayerFlow {lf['layers']} layers at {lf['height']}x{lf['width']}, {lf['prompt_blocks']} x {tokens} prompt "
          f"tokens, CFG batch 2; step = one transformer call, median of {repeats} after the first")
    print(f"{'frames/layer':>12s} {'latent':>18s} {'video tokens':>12s} {'offload':>8s} {'T5 s':>6s} {'first step s':>13s} "
          f"{'step s':>7s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['frames']:12d} {r['latent']:>18s} {r['tokens']:12d} {str(r['offload']):>8s} {r['encode_s']:6.2f} "
              f"{r['first_step_s']:13.2f} {r['step_s']:7.2f} {r['peak_gib']:9.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the CPU comparison")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared, busy CPU two threads mostly measure contention)")
    parser.add_argument("--gpu-frames", type=int, nargs="+", default=[16, 49], help="frames per layer on the GPU")
    parser.add_argument("--gpu-repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--gpu-smoke", action="store_true", help="run the GPU code on CPU with toy shapes")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import diffusers

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} with {args.threads} "
          f"threads, diffusers {diffusers.__version__}")
    if not args.skip_cpu:
        cpu_bench(args.steps, args.repeats)
    gpu_bench(args.gpu_frames, args.gpu_repeats, smoke=args.gpu_smoke)


if __name__ == "__main__":
    main()
