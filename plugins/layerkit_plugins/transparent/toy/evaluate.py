"""Score the toy transparent model and its ablations on held-out shapes-world sprites.

Every row samples through ``layerkit.sampling.run.sample`` exactly as ``layerkit sample`` does
(image-to-video: the middle frame of held-out test clip i is imposed clean, the prompt is
the clip's) and reads the evaluator's figures from the run's record.json
(``layerkit_plugins.transparent.evaluate.evaluate_rgba_video``, averaged over the clips). Two reference
rows are scored directly: the ground-truth clips themselves and their round trip through
the toy's latent space (offset encoder + VAE, then VAE + transparent decoder), the best any
generator in that latent space can do. Two more need no model and say what copying the given
frame is worth: the reference (middle) frame held still over every frame, and the reference
frame translated in the prompt's direction at the mean speed of the shapes world (the speed
itself is not in the prompt): what a generator that keeps the sprite and moves it as asked,
with no sense of its speed, would score.

    python -m layerkit_plugins.transparent.toy.evaluate [--num-samples 16] [--out runs/toy_transparent_eval]

Without ``--base``/``--weights-dir`` it scores the committed weights.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from layerkit.data.shapes import DIRECTIONS
from layerkit.errors import LayerkitError

#: (row label, experiment, what the row is)
ROWS = (
    ("motion module applied directly (no stage 2)", "toy_transparent_base",
     "the RGB-trained motion module under the transparent image model, the middle frame imposed, nothing trained"),
    ("motion module fine-tuned, no IFA", "toy_transparent_baseline", "stage 2 trains the motion module"),
    ("toy_transparent: Inter-Frame Attention", "toy_transparent", "stage 2 trains W_Q' and W_O' only"),
)
#: evaluator figures in the table: (key, header, better)
COLUMNS = (
    ("alpha_iou", "alpha IoU", "higher"),
    ("alpha_temporal_error", "alpha temporal error", "lower"),
    ("identity_drift", "identity drift", "lower"),
    ("colour_correct", "colour correct", "higher"),
    ("shape_correct", "shape correct", "higher"),
    ("direction_correct", "direction correct", "higher"),
)
WEIGHT_FILES = {"toy_transparent": "inter_frame_attention.safetensors",
                "toy_transparent_baseline": "baseline_motion_module.safetensors"}


def sample_row(experiment: str, out: Path, *, num_samples: int, seed: int, base: str | None,
               weights: str | None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Sample ``num_samples`` held-out clips with ``experiment``; its record's metrics plus timing."""
    from layerkit.sampling.run import sample

    overrides = [f"+experiment={experiment}", f"output_dir={out}", "overwrite=true",
                 f"+inputs.num_samples={num_samples}", f"+inputs.seed={seed}", "sampler.progress=false", *extra]
    if base:
        overrides.append(f"toy.base={base}")
    if weights:
        overrides.append(f"weights={weights}")
    started = time.perf_counter()
    path = sample(overrides)
    record = json.loads((path / "record.json").read_text())
    return {**record["metrics"], "seconds": round(time.perf_counter() - started, 2), "output_dir": str(path)}


def translate_rgba(frame: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """An RGBA frame [4, H, W] (straight alpha) moved by (dx, dy) px, bilinear, transparent where it
    comes in from outside; colour is moved premultiplied and divided back (0.5 where alpha is 0)."""
    import torch.nn.functional as F

    h, w = frame.shape[-2:]
    alpha = frame[3:]
    premultiplied = torch.cat([frame[:3] * alpha, alpha])[None]
    theta = torch.tensor([[[1.0, 0.0, -2 * dx / w], [0.0, 1.0, -2 * dy / h]]], dtype=frame.dtype,
                         device=frame.device)
    grid = F.affine_grid(theta, list(premultiplied.shape), align_corners=False)
    moved = F.grid_sample(premultiplied, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    a = moved[3:]
    rgb = torch.where(a > 1e-4, moved[:3] / a.clamp_min(1e-4), torch.full_like(moved[:3], 0.5)).clamp(0, 1)
    return torch.cat([rgb, a.clamp(0, 1)])


def reference_copies(clip: dict[str, Any], speed: float) -> dict[str, torch.Tensor]:
    """The clip's reference frame held still, and moved at ``speed`` px/frame in its direction."""
    from layerkit.data.shapes import direction_vector
    from layerkit_plugins.transparent.inter_frame import reference_frame

    rgba = clip["rgba"]
    m = reference_frame(rgba.shape[0])
    vx, vy = direction_vector(clip["meta"]["direction"])
    moved = [translate_rgba(rgba[m], vx * speed * (t - m), vy * speed * (t - m)) for t in range(rgba.shape[0])]
    return {"still": rgba[m][None].expand_as(rgba).clone(), "moved": torch.stack(moved)}


def truth_rows(num_samples: int, seed: int, base: str | None) -> dict[str, dict[str, float]]:
    """The evaluator on the ground truth, on the ground truth through the toy latent space, and on
    copies of the reference frame (held still; moved at the mean speed in the prompt's direction)."""
    from layerkit.data.shapes import ShapesConfig, seed_for
    from layerkit_plugins.transparent.data import make_rgba_sprite_clip
    from layerkit_plugins.transparent.evaluate import evaluate_rgba_video, summarise
    from layerkit_plugins.transparent.toy.model import FRAMES, SIZE, load_base, package_weights

    backbone = load_base(base or package_weights() / "base").eval()
    cfg = ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE)
    mean_speed = sum(cfg.speed) / 2
    truth, round_trip, still, moved = [], [], [], []
    for i in range(num_samples):
        clip = make_rgba_sprite_clip(seed_for("test", seed, i), cfg)
        truth.append(evaluate_rgba_video(clip["rgba"], clip))
        copies = reference_copies(clip, mean_speed)
        still.append(evaluate_rgba_video(copies["still"], clip))
        moved.append(evaluate_rgba_video(copies["moved"], clip))
        with torch.no_grad():
            video = backbone.decode_latents(backbone.encode_video(clip["rgba"][None] * 2 - 1))[0]
        round_trip.append(evaluate_rgba_video(((video + 1) / 2).clamp(0, 1), clip))
    return {"ground truth": summarise(truth), "ground truth through the latent space": summarise(round_trip),
            "reference frame held still (no model)": summarise(still),
            f"reference frame moved at the mean speed, {mean_speed:g} px/frame (no model)": summarise(moved)}


#: the motion phrase of a shapes-world sprite prompt ("... moving right", "... standing still")
_MOTION = re.compile(r"(moving (left|right|up|down)|standing still)$")
MOVING = DIRECTIONS[:4]  # the moving words of the shapes world (the fifth is "still")


def direction_swap(experiment: str, *, num_samples: int = 16, seed: int = 0, base: str | None = None,
                   weights: str | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Does the prompt's direction word reach the motion? Each of ``num_samples`` held-out test
    clips is sampled four times with the same reference frame and noise, its prompt's motion
    phrase replaced by "moving left/right/up/down"; ``follows`` is the fraction of the 4 x N
    samples whose estimated direction (:func:`layerkit.data.evaluate.estimate_direction`) is the
    word asked (0.25 for motion that ignores the word, 0 for a sprite that stays still),
    ``still`` the fraction that does not move, ``per_word`` ``follows`` per word."""
    from layerkit.config import compose
    from layerkit.data.evaluate import estimate_direction
    from layerkit.registry import get_registry
    from layerkit.sampling.run import build_sampler

    overrides = [f"+experiment={experiment}", f"+inputs.num_samples={num_samples}", f"+inputs.seed={seed}",
                 "sampler.progress=false", *extra]
    if base:
        overrides.append(f"toy.base={base}")
    if weights:
        overrides.append(f"weights={weights}")
    registry = get_registry()
    sampler = build_sampler(compose("sample", overrides, registry), registry)
    batch = sampler.samples()
    if any(not _MOTION.search(p) for p in batch["prompt"]):
        raise LayerkitError(f"--direction-swap needs shapes-world prompts ending in a motion phrase; got "
                            f"{batch['prompt']}.")
    per_word: dict[str, float] = {}
    still = 0
    for word in MOVING:
        swapped = dict(batch, prompt=[_MOTION.sub(f"moving {word}", p) for p in batch["prompt"]])
        found = [estimate_direction(out["alpha"]) for out in sampler.run(swapped).outputs]
        per_word[word] = sum(d == word for d in found) / len(found)
        still += sum(d == "still" for d in found)
    return {"follows": sum(per_word.values()) / len(MOVING), "still": still / (len(MOVING) * len(batch["prompt"])),
            "per_word": per_word, "num_samples": len(batch["prompt"])}


def evaluate(out: str | Path, *, num_samples: int = 64, seed: int = 0, base: str | None = None,
             weights_dir: str | None = None, extra: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Every row of the comparison, label -> figures (``seconds``: sampling wall time); ``extra``:
    config overrides for every sampled row (``sampler.guidance_scale=3.0``)."""
    out = Path(out)
    results: dict[str, dict[str, Any]] = dict(truth_rows(num_samples, seed, base))
    for label, experiment, _ in ROWS:
        weights = str(Path(weights_dir) / WEIGHT_FILES[experiment]) if weights_dir and experiment in WEIGHT_FILES \
            else None
        results[label] = sample_row(experiment, out / experiment, num_samples=num_samples, seed=seed, base=base,
                                    weights=weights, extra=extra)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the evaluator's figures."""
    head = "| | " + " | ".join(f"{h} ({'↑' if b == 'higher' else '↓'})" for _, h, b in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for label, row in results.items():
        cells = [f"{row[k]:.3f}" if k in row else "" for k, _, _ in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/toy_transparent_eval", help="where the sampled runs go")
    parser.add_argument("--num-samples", type=int, default=64, help="held-out test clips per row")
    parser.add_argument("--seed", type=int, default=0, help="test-split seed of the clips (inputs.seed)")
    parser.add_argument("--base", default=None, help="a base folder (default: the committed toy/weights/base)")
    parser.add_argument("--weights-dir", default=None, help="folder with the stage-2 weight files (default: committed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--direction-swap", type=int, default=0, metavar="N",
                        help="instead of the table: N test clips per stage-2 row, each sampled with its prompt's "
                             "direction word swapped among left/right/up/down; prints how often the motion follows")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every sampled row, e.g. sampler.guidance_scale=3.0 (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.override:  # a bad override is one sentence before anything is sampled
        from layerkit.checks import check_config
        from layerkit.config import compose
        from layerkit.registry import get_registry

        try:
            check_config("sample", compose("sample", [f"+experiment={ROWS[-1][1]}", *args.override], get_registry()))
        except LayerkitError as error:
            parser.error(f"--override: {error}")
    if args.direction_swap > 0:
        rows = {}
        for label, experiment, _ in ROWS:
            weights = str(Path(args.weights_dir) / WEIGHT_FILES[experiment]) \
                if args.weights_dir and experiment in WEIGHT_FILES else None
            rows[label] = direction_swap(experiment, num_samples=args.direction_swap, seed=args.seed, base=args.base,
                                         weights=weights, extra=args.override)
            print(f"| {label} | follows {rows[label]['follows']:.3f} | still {rows[label]['still']:.3f} | "
                  + " ".join(f"{w} {v:.3f}" for w, v in rows[label]["per_word"].items()) + " |", flush=True)
        return 0
    results = evaluate(args.out, num_samples=args.num_samples, seed=args.seed, base=args.base,
                       weights_dir=args.weights_dir, extra=args.override)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    settings = {"num_samples": args.num_samples, "seed": args.seed, "base": args.base,
                "weights_dir": args.weights_dir, "override": list(args.override)}
    (Path(args.out) / "results.json").write_text(json.dumps({"settings": settings, "rows": results}, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
