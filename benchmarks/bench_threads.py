"""Torch threads against machine load: the measurement behind ``threads: auto``.

    python benchmarks/bench_threads.py [--steps 25] [--repeats 3]

Samples the embedded default (the toy LayerFlow, ``layerkit sample``'s own code path) with 1 and
with all cores' threads, on an otherwise idle machine and with 1 .. cores-1 busy processes beside it
(each spinning one core, as another job would), and prints denoising steps per second (median of
``--repeats``). On a busy machine more threads than free cores thrash (threads wait on each other
for a core); ``threads: auto`` takes the free cores (cores less the 1-minute load average).
Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def _spin(stop) -> None:  # a busy job: one core at 100%
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2**31


def steps_per_second(threads: int, steps: int, repeats: int) -> float:
    import torch

    from layerkit.config import compose
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler

    torch.set_num_threads(threads)
    registry = get_registry()
    cfg = compose("sample", [f"sampler.steps={steps}", "sampler.progress=false"], registry)
    sampler = build_sampler(cfg, registry)
    batch = sampler.samples()
    sampler.run(batch)  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        sampler.run(batch)
        rates.append(steps / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows = []
    for busy in range(cores):
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        time.sleep(1.0)
        try:
            for threads in sorted({1, cores}):
                rate = steps_per_second(threads, args.steps, args.repeats)
                rows.append({"busy_processes": busy, "threads": threads, "steps_per_s": round(rate, 2)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stop.set()
            for p in spinners:
                p.join()
    print("\n| busy processes beside it | threads | steps/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['busy_processes']} | {r['threads']} | {r['steps_per_s']} |")


if __name__ == "__main__":
    main()
