"""``layerkit curate INPUT OUTPUT [overrides]``: the command line of the curation plugin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerkit.errors import LayerkitError

USAGE = """layerkit curate INPUT OUTPUT [overrides]

Turn a video (or a folder of videos) into layered training clips: per clip the frames, layer
masklets (COCO RLE), motion scores, tracks, per-layer sketches, a manifest and a preview
(docs/curation.md). Resumable: clips already in OUTPUT are skipped.

overrides (Hydra), e.g.:
  clip.num_frames=16 clip.max_per_video=null merge.eta_s=1.0 merge.capacity=4
  cuts.motion_coherence.eta_f=85 cuts.scenedetect.enabled=true
  flow=raft flow.path=/weights/raft_large.pth   segmenter=sam2 segmenter.path=/weights/sam2.1-hiera-tiny
  tracker=cotracker3 tracker.checkout=/src/co-tracker tracker.checkpoint=/weights/scaled_offline.pth
  sketch=lineart sketch.path=/weights/sk_model.pth   progress=false overwrite=true"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="layerkit curate", usage=USAGE, add_help=True)
    parser.add_argument("input", help="a video file or a folder of videos (searched recursively)")
    parser.add_argument("output", help="the folder the curated clips go to")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/curate.yaml")
    args = parser.parse_args(argv)
    try:
        from omegaconf import OmegaConf, open_dict

        from layerkit.config import compose
        from layerkit.registry import get_registry
        from layerkit_plugins.curation.pipeline import curate, format_summary

        registry = get_registry()
        cfg = compose("curate", args.overrides, registry)
        with open_dict(cfg):
            cfg.input, cfg.output = args.input, args.output
        OmegaConf.resolve(cfg)
        summary = curate(cfg, registry)
        print(format_summary(summary, Path(args.output)))
        return 0
    except LayerkitError as exc:
        print(f"layerkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerkit: interrupted (clips written so far are complete; run again to resume)", file=sys.stderr)
        return 130
