"""Score the toy LayerAnimate on held-out shapes clips, and its ablation (motion-based assignment on/off).

    OMP_NUM_THREADS=1 nice -n 5 layerkit toy-layeranimate-eval --num-samples 16 --seed 0

Each row samples the same held-out (``test`` split) shapes-world clips that ``layerkit sample
+experiment=EXPERIMENT +inputs.num_samples=N +inputs.seed=S`` samples, with the same code path
(compose, build, load the committed weights, the one denoising loop, decode), and is scored by
``layeranimate.evaluate.evaluate_layers`` (what ``layerkit sample`` writes into record.json):
trajectory error of controlled sprites, drift of static layers, motion-score agreement, sprite
identity, frame and keyframe errors. Rows:

- ``base ToonCrafter`` (the toy's base stage, no ControlNet: what the controls add);
- ``LayerAnimate`` (``toy_layeranimate``: motion-based assignment on, as the paper);
- ``w/o MA`` (``toy_layeranimate_no_ma``: every layer dynamic, the paper's Tab. 2 ablation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "base ToonCrafter": ["+experiment=toy_layeranimate", "controls={}", "adapters={}", "weights=null"],
    "LayerAnimate": ["+experiment=toy_layeranimate"],
    "w/o MA": ["+experiment=toy_layeranimate_no_ma"],
}
COLUMNS = ("trajectory_error", "trajectory_found", "static_drift", "static_error", "motion_rank_corr",
           "motion_error", "sprite_identity", "frame_error", "keyframe_error")


def evaluate(num_samples: int, seed: int, rows: list[str]) -> dict[str, dict[str, float]]:
    from layerkit.config import compose
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler

    registry = get_registry()
    table: dict[str, dict[str, float]] = {}
    for name in rows:
        started = time.perf_counter()
        cfg = compose("sample", [*ROWS[name], f"+inputs.num_samples={num_samples}", f"+inputs.seed={seed}",
                                 "sampler.progress=false"], registry)
        result = build_sampler(cfg, registry).run()
        table[name] = {**(result.metrics or {}), "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps({name: table[name]}), flush=True)
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    head = "| model | " + " | ".join(COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [head, rule]
    for name, row in table.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="layerkit toy-layeranimate-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    table = evaluate(args.num_samples, args.seed, args.rows)
    print(markdown(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
