"""Layer curation measured on the shapes world, whose layers, motions and tracks are known.

Writes shapes-world videos (H.264 .mp4, 1 to 3 sprites, with captions) and as many spliced ones
(the first half of one clip joined to the second half of another: a cut), runs the real
``layerkit curate`` pipeline over the folder with the default steps, reads the clips back with
``read_clip`` and compares them with the truth:

- layer-recovery IoU (goal >= 0.8): evaluate.layer_iou against the truth's layers grouped by the
  merging rule, on flow scores (isolates segmentation) and on true speeds;
- motion-score rank agreement: Spearman between true speeds and curated scores, pooled over clips;
- track error (px): the default tracker from the truth's first-frame points;
- spliced clips dropped (goal >= 95%) and clean clips dropped (goal <= 5%), for the motion-coherence
  rule (in the pipeline) and PySceneDetect (run on the same frames, when installed);
- CPU throughput of the whole pipeline (frames/s, writing included) and time per stage.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_curation.py [--clips 60] [--size 64] [--eta-f 0.8]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=60, help="clean clips (and as many spliced ones)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width (px)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--eta-f", type=float, default=0.8, help="motion-coherence threshold (px/frame)")
    parser.add_argument("--eta-s", type=float, default=1.0, help="merging threshold (px/frame)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="keep the videos and clips in this folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from layerkit_plugins.curation import evaluate as ev
    from layerkit_plugins.curation import read_clip
    from layerkit_plugins.curation.flow import OpenCVFlow
    from layerkit_plugins.curation.pipeline import curate, format_summary
    from layerkit_plugins.curation.track import LucasKanadeTracker
    from omegaconf import open_dict

    from layerkit.config import compose
    from layerkit.data.shapes import ShapesConfig, make_sample
    from layerkit.io.video import read_video, write_video
    from layerkit.registry import get_registry

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_curation_"))
    videos, out = root / "videos", root / "curated"
    videos.mkdir(parents=True, exist_ok=True)
    configs = [ShapesConfig(num_frames=args.frames, height=args.size, width=args.size, num_sprites=k) for k in (1, 2, 3)]
    samples = {}
    for i in range(args.clips):
        cfg = configs[i % 3]
        sample = make_sample(i, cfg)
        samples[f"clean{i:03d}_00000"] = sample
        write_video(videos / f"clean{i:03d}.mp4", ev.frames_uint8(sample), 8, overwrite=True)
        (videos / f"clean{i:03d}.txt").write_text(sample["prompt"])
        other = ev.frames_uint8(make_sample(100_000 + i, cfg))
        half = args.frames // 2
        write_video(videos / f"spliced{i:03d}.mp4", np.concatenate([ev.frames_uint8(sample)[:half], other[half:]]),
                    8, overwrite=True)

    registry = get_registry()
    cfg = compose("curate", [f"cuts.motion_coherence.eta_f={args.eta_f}", f"merge.eta_s={args.eta_s}",
                             "progress=false"], registry)
    with open_dict(cfg):
        cfg.input, cfg.output, cfg.overwrite = str(videos), str(out), True
    start = time.perf_counter()
    summary = curate(cfg, registry)
    wall = time.perf_counter() - start
    print(format_summary(summary, out))

    dropped = {p.stem for p in (out / ".dropped").glob("*.json")} if (out / ".dropped").exists() else set()
    clean_ids = [f"clean{i:03d}_00000" for i in range(args.clips)]
    spliced_ids = [f"spliced{i:03d}_00000" for i in range(args.clips)]
    flow, tracker = OpenCVFlow(), LucasKanadeTracker()
    scenedetect = None
    try:
        from layerkit_plugins.curation.cuts import SceneDetectCut

        scenedetect = SceneDetectCut()
    except Exception as exc:  # optional extra
        print(f"PySceneDetect: skipped ({exc})")

    iou_flow, iou_true, pairs, track_err, layers = [], [], [], [], []
    for cid in clean_ids:
        if cid in dropped:
            continue
        sample, clip = samples[cid], read_clip(out / cid)
        frames = (clip["frames"].permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        masks = clip["layer_masks"][:, :, 0].numpy() > 0.5
        f = flow(frames)
        iou_flow.append(ev.layer_iou(masks, ev.truth_groups(sample, ev.truth_flow_scores(sample, f.magnitude),
                                                             4, args.eta_s)))
        iou_true.append(ev.layer_iou(masks, ev.truth_groups(sample, sample["motion_scores"].numpy(), 4, args.eta_s)))
        pairs += ev.motion_pairs(sample, masks, clip["motion_scores"].numpy())
        tracks, _ = tracker(frames, ev.track_queries(sample), f)
        track_err.append(ev.track_errors(sample, tracks))
        layers.append(clip["num_layers"])
    errors = np.concatenate(track_err)
    truth_speed, est = (np.array(v) for v in zip(*pairs))

    sd = {"clean": [], "spliced": []}
    if scenedetect is not None:
        for kind, ids in (("clean", clean_ids), ("spliced", spliced_ids)):
            for cid in ids:
                sd[kind].append(bool(scenedetect(read_video(videos / f"{cid[:-6]}.mp4").frames[..., :3]).cuts))
    mc_spliced = np.mean([cid in dropped for cid in spliced_ids])
    mc_clean = np.mean([cid in dropped for cid in clean_ids])
    frames_total = summary["frames"]

    print()
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"{args.clips} clean + {args.clips} spliced clips of {args.frames}x{args.size}x{args.size} (H.264 .mp4)")
    print(f"settings: default steps (colour_motion, DIS, Lucas-Kanade, Canny), merge.eta_s={args.eta_s}, "
          f"capacity 4, cuts.motion_coherence.eta_f={args.eta_f}")
    print("| measure | figure | goal |")
    print("| --- | --- | --- |")
    print(f"| layer-recovery IoU, truth grouped on flow scores (segmentation) | {np.mean(iou_flow):.3f} "
          f"(median {np.median(iou_flow):.3f}, {np.mean(np.array(iou_flow) >= 0.8):.0%} of clips >= 0.8) | >= 0.8 |")
    print(f"| layer-recovery IoU, truth grouped on true speeds (segmentation + flow) | {np.mean(iou_true):.3f} "
          f"(median {np.median(iou_true):.3f}) | |")
    print(f"| motion-score rank agreement (Spearman, {len(pairs)} truth layers) | {ev.spearman(pairs):.3f} | |")
    print(f"| motion-score error, mean abs (px/frame) | {np.mean(np.abs(est - truth_speed)):.3f} | |")
    print(f"| track error (px), mean / median / p90 over {errors.size} visible points | {errors.mean():.2f} / "
          f"{np.median(errors):.2f} / {np.percentile(errors, 90):.2f} | |")
    print(f"| spliced clips dropped, motion coherence | {mc_spliced:.1%} | >= 95% |")
    print(f"| clean clips dropped, motion coherence | {mc_clean:.1%} | <= 5% |")
    if scenedetect is not None:
        either_spliced = np.mean([s or (cid in dropped) for s, cid in zip(sd["spliced"], spliced_ids)])
        either_clean = np.mean([s or (cid in dropped) for s, cid in zip(sd["clean"], clean_ids)])
        print(f"| spliced / clean dropped, PySceneDetect (threshold 27) | {np.mean(sd['spliced']):.1%} / "
              f"{np.mean(sd['clean']):.1%} | |")
        print(f"| spliced / clean dropped, either | {either_spliced:.1%} / {either_clean:.1%} | |")
    print(f"| layers per kept clip (mean) | {np.mean(layers):.2f} | |")
    print(f"| CPU throughput, whole pipeline incl. reading and writing | {frames_total / wall:.1f} frames/s "
          f"({frames_total} frames in {wall:.1f} s) | |")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items())
    print(f"| time per stage | {stages} | |")
    (root / "bench.json").write_text(json.dumps({
        "iou_flow": iou_flow, "iou_true": iou_true, "spearman": ev.spearman(pairs),
        "track_error_mean": float(errors.mean()), "spliced_dropped": float(mc_spliced),
        "clean_dropped": float(mc_clean), "frames_per_s": frames_total / wall, "summary": summary}, indent=2))
    print(f"files: {root}")


if __name__ == "__main__":
    main()
