"""Evaluate the toy LayerFlow on held-out shapes clips: stage 1 alone vs all three stages, four tasks.

    OMP_NUM_THREADS=1 nice -n 5 layerkit toy-layerflow-eval --num-samples 16 --seed 0
    OMP_NUM_THREADS=1 layerkit toy-layerflow-eval --split val --num-samples 32 --grid '' --grid 'sampler.guidance_scale=2.0'

Each model samples, in one batch, the held-out (``test`` split, or ``--split val`` for choosing
settings) shapes-world prompts that ``layerkit sample +inputs.num_samples=N +inputs.seed=S
[+inputs.split=val]`` samples, with the same code path
(compose, build, load weights, the one denoising loop, decode, unpack), and is scored by the
shapes-world evaluator (``LayeredTask.evaluate``: the figures ``layerkit sample`` writes into
record.json). Two reference rows: the true layers after a VAE round trip (one pass over the
packed clip: the best this VAE allows) and the true layers as they are.

``alpha_iou`` follows the task (``layered.evaluate.evaluate_layered``): for decompose and fg2bg
the given clip fixes where the sprite is, so the matte is scored against the held-out clip's
alpha; for generate and bg2fg nothing does (the prompt names colour, shape and motion), so it is
scored against the matte the output composite implies (``alpha_iou_composite``: does the matte
cover exactly the sprite the output blended video shows over the output background). Both are
in the table; ``alpha_iou_heldout`` of a generate row measures luck of placement. One more
generation figure: ``fg_in_background``, the share of the pixels under the output matte where
the output background has the prompt's sprite colour (nearest palette colour; background
palettes never contain it): foreground left in the background.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from layerkit.data.shapes import BACKGROUND_COLOURS

_STAGE1 = ["+experiment=toy_layerflow_stage1", "weights=${pkg:layerkit_plugins.layerflow.toy/weights/stage1.safetensors}"]
_STAGE3 = ["+experiment=toy_layerflow_stage3"]
#: row name -> ``layerkit sample`` overrides: text-to-video (generate) for both models, then the
#: conditional tasks (the given part from the held-out clip: blended for decompose, foreground +
#: alpha for fg2bg, background for bg2fg). For decompose, alpha_iou and background_leak compare
#: with the very clip that was given, so there they measure quality, not placement luck.
MODELS: dict[str, list[str]] = {
    "stage 1 alone, generate": _STAGE1,
    "stages 1+2+3, generate": _STAGE3,
    "stage 1 alone, decompose": [*_STAGE1, "task=layerflow_decompose"],
    "stages 1+2+3, decompose": [*_STAGE3, "task=layerflow_decompose"],
    "stages 1+2+3, fg2bg": [*_STAGE3, "task=layerflow_fg2bg"],
    "stages 1+2+3, bg2fg": [*_STAGE3, "task=layerflow_bg2fg"],
}
COLUMNS = ("colour_correct", "shape_correct", "direction_correct", "compositing_error", "alpha_iou",
           "alpha_iou_heldout", "alpha_iou_composite", "fg_in_background", "background_leak", "background_error")
_NAMES = list(BACKGROUND_COLOURS)
_TABLE = torch.tensor([BACKGROUND_COLOURS[c] for c in _NAMES])


def generation_metrics(layers: dict[str, torch.Tensor], sprite_colour: str) -> dict[str, float]:
    alpha = layers["alpha"][:, 0] >= 0.5                                           # [F, H, W]
    bg = layers["background"].permute(0, 2, 3, 1)[alpha]                            # [P, 3]
    if bg.shape[0] == 0:
        leak = 0.0
    else:
        nearest = torch.cdist(bg.float(), _TABLE).argmin(1)
        leak = (nearest == _NAMES.index(sprite_colour)).float().mean().item()
    return {"fg_in_background": leak}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    from layerkit.data.evaluate import summarise

    return summarise(rows)


def sample_model(overrides: list[str], num_samples: int, seed: int, extra: list[str] = ()) -> dict[str, Any]:
    """Sample and score one model with ``layerkit sample``'s own sampler (build, run); returns the
    evaluator's summary plus generation figures."""
    from layerkit.config import compose
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler

    registry = get_registry()
    cfg = compose("sample", [*overrides, f"+inputs.num_samples={num_samples}", f"+inputs.seed={seed}",
                             "sampler.progress=false", *extra], registry)
    started = time.perf_counter()
    result = build_sampler(cfg, registry).run()
    from layerkit_plugins.layered.task import GIVEN

    rows = [] if "background" in GIVEN.get(cfg.task.mode, ()) else [  # a given background is not the model's
        generation_metrics(out, truth["meta"]["sprites"][0]["colour"])
        for out, truth in zip(result.outputs, result.batch["ground_truth"], strict=True)]
    s = cfg.sampler
    return {**(result.metrics or {}), **_mean(rows), "seconds": time.perf_counter() - started,
            "steps": int(s.steps), "guidance_scale": float(s.guidance_scale)}


def true_layers(num_samples: int, seed: int, round_trip: bool = True, split: str = "test",
                extra: list[str] = ()) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any], Any]:
    """The true layers of the held-out clips ``layerkit sample`` samples, after a VAE round trip
    (one pass over the packed clip, as generation packs it), or as they are (``round_trip=False``);
    ``extra``: the overrides the models were sampled with (e.g. ``backbone.path=DIR``: that
    folder's VAE). Returns the unpacked layers, the batch and the task that scores them."""
    from layerkit.config import compose
    from layerkit.pipeline import decode_packed, encode_packed
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler

    registry = get_registry()
    cfg = compose("sample", ["+experiment=toy_layerflow_stage3", f"+inputs.num_samples={num_samples}",
                             f"+inputs.seed={seed}", f"+inputs.split={split}", *extra, "task.mode=generate",
                             "weights=null", "init_from=[]"],  # no denoiser runs: none is loaded (any geometry)
                  registry)
    sampler = build_sampler(cfg, registry)
    parts = sampler.parts
    parts.task.train_modes = {}  # pack every layer as generation does (no frame-0 copy), no random mode
    batch = sampler.samples()
    packed = parts.task.pack(batch, training=True)
    with torch.no_grad():
        if round_trip:
            latents, layout = encode_packed(parts.backbone, packed, training=True)
            decoded = {k: v.float() for k, v in decode_packed(parts.backbone, latents, packed, layout).items()}
        else:
            decoded = {seg.name: seg.video.float() for seg in packed.segments}
    return parts.task.unpack(decoded, batch), batch, parts.task


def vae_ceiling(num_samples: int, seed: int, round_trip: bool = True, split: str = "test",
                extra: list[str] = ()) -> dict[str, Any]:
    """The evaluator's figures of :func:`true_layers`: a perfect denoiser's through this VAE
    (``round_trip``), or a perfect model's (not)."""
    outputs, batch, task = true_layers(num_samples, seed, round_trip, split, extra)
    summary = task.evaluate(outputs, batch)
    rows = [generation_metrics(out, truth["meta"]["sprites"][0]["colour"])
            for out, truth in zip(outputs, batch["ground_truth"], strict=True)]
    return {**summary, **_mean(rows)}


def table(results: dict[str, dict[str, Any]]) -> str:
    head = "| model, task | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in results.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else "-" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rounded(row: dict[str, Any]) -> str:
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def sweep(grid: list[str], rows: list[str], num_samples: int, seed: int, split: str,
          extra: list[str] = ()) -> dict[str, dict[str, Any]]:
    """Each sampler setting of ``grid`` (an entry: space-separated ``sample`` overrides, after
    ``extra``) on each model row of ``rows`` (MODELS names): for choosing sampler defaults on the
    ``val`` split."""
    results = {}
    for setting in grid:
        for name in rows:
            row = sample_model(MODELS[name], num_samples, seed, [f"+inputs.split={split}", *extra, *setting.split()])
            results[f"{name}; {setting or 'committed sampler'}"] = row
            print(f"{name}; {setting}", _rounded(row), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="inputs.seed: which held-out clips")
    parser.add_argument("--split", default="test", choices=("val", "test"),
                        help="held-out split: test (what records report) or val (for choosing settings)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--grid", action="append", default=None, metavar="SETTING",
                        help="sweep instead, one --grid per setting: SETTING (quoted, space-separated sample "
                             "overrides, '' for the committed sampler) on each of --rows, after the overrides")
    parser.add_argument("--rows", action="append", default=None, choices=list(MODELS),
                        help="a model row a --grid sweep samples (repeat; default: stages 1+2+3 generate and "
                             "decompose)")
    parser.add_argument("--vae-only", action="store_true",
                        help="only the VAE ceiling and the true layers (no denoiser): a VAE's bound on the targets, "
                             "e.g. with backbone.path=DIR of a toy-layerflow-vae run's base")
    parser.add_argument("overrides", nargs="*", help="extra sample overrides for both models (e.g. sampler.steps=50)")
    args = parser.parse_args(argv)
    if args.vae_only and args.grid is not None:
        parser.error("--vae-only samples no model; leave out --grid (and --rows)")
    if args.rows and args.grid is None:
        parser.error("--rows chooses the rows of a --grid sweep; give --grid SETTING too")
    if args.json and Path(args.json).exists():
        parser.error(f"--json '{args.json}' exists; choose a new file (nothing is overwritten).")
    rows = args.rows or ["stages 1+2+3, generate", "stages 1+2+3, decompose"]
    heading = f"held-out shapes prompts: {args.split} split, inputs.seed={args.seed}, {args.num_samples} samples"
    if args.grid is not None:
        results = sweep(args.grid, rows, args.num_samples, args.seed, args.split, args.overrides)
    else:
        results = {}
        extra = [f"+inputs.split={args.split}", *args.overrides]
        for name, overrides in ({} if args.vae_only else MODELS).items():
            results[name] = sample_model(overrides, args.num_samples, args.seed, extra)
            print(name, _rounded(results[name]), flush=True)
        results["VAE ceiling (true layers, VAE round trip)"] = vae_ceiling(args.num_samples, args.seed, split=args.split,
                                                                           extra=args.overrides)
        results["true layers (no VAE)"] = vae_ceiling(args.num_samples, args.seed, round_trip=False, split=args.split,
                                                      extra=args.overrides)
    print()
    print(heading)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
