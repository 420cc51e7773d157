"""Core CPU figures: shapes-world sample generation and one toy training/sampling step.

Run: python benchmarks/bench_core.py   (figures go to docs/benchmarks.md by hand, with the machine)
"""

from __future__ import annotations

import platform
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from layerkit.data.shapes import ShapesConfig, make_sample

    torch.set_num_threads(2)
    cfg = ShapesConfig(num_frames=16, num_sprites=2)
    seeds = iter(range(10_000))
    t = timed(lambda: make_sample(next(seeds), cfg), 50)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads 2")
    print(f"make_sample 16x32x32, 2 sprites: {t * 1e3:.2f} ms (median of 50)")

    from layerkit.config import compose
    from layerkit.pipeline import build_parts, encode_packed, make_step, predict
    from layerkit.registry import get_registry
    from layerkit.training.data import default_collate

    registry = get_registry()
    c = compose("train", ["+experiment=toy_layered"], registry)
    parts = build_parts(c, registry, training=False)
    batch = default_collate([make_sample(i, ShapesConfig(num_frames=8)) for i in range(4)])
    packed = parts.task.pack(batch, training=True)
    cond = parts.backbone.encode_prompt_blocks(packed.prompts)
    latents, _ = encode_packed(parts.backbone, packed, training=True)
    t_steps = torch.full((4,), 500)
    with torch.no_grad():
        t = timed(lambda: predict(parts, packed, make_step(packed, latents, t_steps, cond)), 10)
    print(f"toy.dit forward, batch 4 x 4 layers x 8 frames x 32x32: {t * 1e3:.1f} ms (median of 10)")


if __name__ == "__main__":
    main()
