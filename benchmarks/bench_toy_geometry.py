"""The toy LayerFlow's denoiser geometry against its training cost: what a 45-minute stage affords
for each patch size, width and depth (the committed toy: patch 2, width 128 in 4 heads, 6 blocks;
the width-64 model before it and a patch-1 model were trained and scored lower,
``toy/weights/model_before/MODEL_CARD.md``).

    OMP_NUM_THREADS=1 python benchmarks/bench_toy_geometry.py [--repeats 3] [--compile] [--only-committed]

Times one training step (forward, backward, AdamW) of ``CogVideoXTransformer3DModel`` on what a
toy stage-1 batch holds: 8 packed clips of 8 latent frames of 8 x 8 x 8 latents (``--latent-channels``:
16 for the tried 16-channel VAE) and 3 prompt
blocks of 16 tokens, for several patch sizes, widths and depths, with one torch thread (each toy
stage trains beside another job on the 2-core machine). Prints seconds per step, the tokens per
latent frame and the parameter count. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

#: (patch, width, heads, blocks): the committed toy (patch 2, width 128), the width-64 and patch-1
#: models that were tried, and other alternatives
GEOMETRIES = [(2, 128, 4, 6), (2, 64, 4, 6), (1, 64, 4, 6), (2, 128, 8, 6), (1, 96, 6, 6), (1, 64, 4, 4)]


def seconds_per_step(patch: int, width: int, heads: int, blocks: int, repeats: int, batch: int = 8,
                     compile: bool = False, bf16: bool = False, channels: int = 8) -> tuple[float, int]:
    """Median seconds of one step after warm-up (``compile``: ``nn.Module.compile`` as
    ``train.compile=true`` does, its first steps build the graph; ``bf16``: autocast to bfloat16)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels, out_channels=channels,
        time_embed_dim=32, text_embed_dim=64, num_layers=blocks, sample_width=8, sample_height=8,
        sample_frames=29, patch_size=patch, max_text_seq_length=48, temporal_compression_ratio=4,
        use_rotary_positional_embeddings=False)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    if compile:
        torch._dynamo.reset()  # a fresh cache per variant: past the recompile limit dynamo falls back to eager
        model.compile(dynamic=False)
    x, text = torch.randn(batch, 8, channels, 8, 8), torch.randn(batch, 48, 64)
    t = torch.randint(0, 1000, (batch,))
    times = []
    warm = 2 if compile else 1
    for i in range(repeats + warm):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(hidden_states=x, encoder_hidden_states=text, timestep=t).sample
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if i >= warm:  # the first steps warm up (and compile)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time each geometry compiled (train.compile=true) and compiled under bf16 autocast")
    parser.add_argument("--latent-channels", type=int, default=8,
                        help="the VAE's latent channels (16: the tried 16-channel VAE)")
    parser.add_argument("--only-committed", action="store_true", help="the committed geometry alone")
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    rows = []
    for patch, width, heads, blocks in GEOMETRIES[:1] if args.only_committed else GEOMETRIES:
        seconds, params = seconds_per_step(patch, width, heads, blocks, args.repeats, channels=args.latent_channels)
        rows.append({"latent_channels": args.latent_channels, "patch": patch, "width": width, "heads": heads, "blocks": blocks, "tokens_per_latent_frame": (8 // patch) ** 2,
                     "seconds_per_step": round(seconds, 3), "parameters": params})
        if args.compile:
            for name, bf16 in (("compiled", False), ("compiled_bf16", True)):
                rows[-1][f"seconds_per_step_{name}"] = round(
                    seconds_per_step(patch, width, heads, blocks, args.repeats, compile=True, bf16=bf16,
                                     channels=args.latent_channels)[0], 3)
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
