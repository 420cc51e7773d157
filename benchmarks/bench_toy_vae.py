"""The toy LayerFlow's VAE on the CPU: one encode of a packed training clip and one decode, with
the clip in the channels-first layout diffusers gets by default and in the channels-last one
``cogvideox.backbone`` hands it on the CPU (``_conv_layout``).

    OMP_NUM_THREADS=2 python benchmarks/bench_toy_vae.py [--repeats 8] [--batch 6]

Times ``AutoencoderKLCogVideoX.encode`` of ``--batch`` packed clips of 33 frames of 32 x 32 (a
stage-1 batch's latent-cache misses: fg2bg's and bg2fg's clips with the copy of frame 0) and
``decode`` of their latents, alternating the layouts ``--rounds`` times; prints the median seconds
per clip of each and the largest difference of their outputs. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "plugins/layerkit_plugins/layerflow/toy/weights/vae"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8, help="timed calls per round and layout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=6)
    args = parser.parse_args()
    import torch
    from layerkit_plugins.cogvideox.backbone import load_vae

    vae = load_vae(WEIGHTS).eval()
    torch.manual_seed(0)
    clip = torch.rand(args.batch, 3, 33, 32, 32) * 2 - 1
    layouts = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last_3d}
    times: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in layouts}
    outputs = {}
    with torch.no_grad():
        latents = vae.encode(clip).latent_dist.mode()
        for _ in range(args.rounds):
            for name, layout in layouts.items():
                x, z = clip.contiguous(memory_format=layout), latents.contiguous(memory_format=layout)
                outputs[name] = (vae.encode(x).latent_dist.mode(), vae.decode(z).sample)  # warm-up
                for what, call in (("encode", lambda x=x: vae.encode(x)), ("decode", lambda z=z: vae.decode(z))):
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        call()
                        times[name][what].append((time.perf_counter() - start) / args.batch)
    row = {"torch_threads": torch.get_num_threads(), "batch": args.batch}
    for name in layouts:
        for what, values in times[name].items():
            row[f"{what}_s_per_clip_{name}"] = round(sorted(values)[len(values) // 2], 4)
    first, last = outputs["channels_first"], outputs["channels_last"]
    row["max_difference_encode"] = float((first[0] - last[0]).abs().max())
    row["max_difference_decode"] = float((first[1] - last[1]).abs().max())
    print(json.dumps(row))


if __name__ == "__main__":
    main()
