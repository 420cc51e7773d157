"""``layerkit curate``: raw videos in, layered training clips out (seed 001 sec. 3, seed 000 sec. 3.3).

Per clip, in order: flow -> cut detectors (a cut drops the clip) -> element segmentation ->
motion-based hierarchical merging -> tracks per layer -> sketches per layer -> files. Each clip
is written into a hidden staging directory and moved into place only when complete, so OUTPUT
never holds half a clip; a clip already in OUTPUT is skipped, which makes a run resumable.
Videos are cut into clips of ``clip.num_frames`` frames (every ``clip.stride``-th frame), at
most ``clip.max_per_video`` per video.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.clip import MANIFEST, write_clip
from layerkit_plugins.curation.merge import Layers, frame_motion_scores, merge_layers
from layerkit_plugins.curation.steps import check_role
from layerkit_plugins.curation.track import LayerTracks, grid_points, layer_tracks

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".m4v")
STAGES = ("read", "flow", "cuts", "segment", "merge", "track", "sketch", "write")
STAGING, DROPPED = ".staging", ".dropped"


@dataclass
class Steps:
    flow: Any
    segmenter: Any
    tracker: Any
    sketch: Any
    cuts: dict[str, Any]
    configs: dict[str, Any]


def build_steps(cfg: Any, registry: Any) -> Steps:
    """Every configured step, built (and its weights checked) before any video is read."""
    from layerkit.config import params

    built, configs = {}, {}
    for role in ("flow", "segmenter", "tracker", "sketch"):
        node = cfg.get(role)
        if node is None or "name" not in node:
            raise LayerkitError(f"the curate config has no {role} step; choose one, e.g. {role}=<name>.")
        built[role] = check_role(registry.build("curation_step", node.name, **params(node)), role, node.name)
        configs[role] = {"name": node.name, **params(node)}
    cuts = {}
    for key, node in (cfg.get("cuts") or {}).items():
        if node is None or not node.get("enabled", True):
            continue
        kwargs = {k: v for k, v in params(node).items() if k != "enabled"}
        cuts[key] = check_role(registry.build("curation_step", node.name, **kwargs), "cuts", node.name)
        configs[f"cuts.{key}"] = {"name": node.name, **kwargs}
    return Steps(built["flow"], built["segmenter"], built["tracker"], built["sketch"], cuts, configs)


@dataclass
class Curated:
    """One curated clip in memory (see clip.py for the files)."""

    frames: np.ndarray
    layers: Layers
    labels: np.ndarray
    tracks: LayerTracks
    sketches: np.ndarray
    frame_motion_scores: np.ndarray


@dataclass
class Dropped:
    kind: str
    reason: str


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def run(self, stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[stage] += time.perf_counter() - start


def curate_frames(frames: np.ndarray, steps: Steps, cfg: Any, *, seed: int = 0, timer: Timer | None = None,
                  on_stage=None) -> Curated | Dropped:
    """Curate one clip's frames uint8 [F, H, W, 3] with ``steps`` and the ``merge``/``tracks`` settings."""
    timer = timer or Timer()
    done = on_stage or (lambda stage: None)
    flow = timer.run("flow", steps.flow, frames)
    done("flow")
    for key, detector in steps.cuts.items():
        report = timer.run("cuts", detector, frames, flow)
        if report.cuts:
            return Dropped(f"cut ({key})", report.reason or f"{key} found a cut")
    done("cuts")
    labels = timer.run("segment", steps.segmenter, frames, flow)
    done("segment")
    m = cfg.merge
    layers = timer.run("merge", merge_layers, labels, flow.magnitude, int(m.capacity), float(m.eta_s),
                       int(m.get("min_layers", 2)))
    done("merge")
    tc = cfg.tracks
    points = grid_points(frames.shape[1], frames.shape[2], int(tc.grid))
    raw, vis = timer.run("track", steps.tracker, frames, points, flow)
    low, high = (int(v) for v in tc.per_layer)
    kept = layer_tracks(raw, vis, layers.masks, in_layer_ratio=float(tc.in_layer_ratio),
                        min_visibility=float(tc.min_visibility), per_layer=(low, high),
                        pool_per_layer=int(tc.pool_per_layer), seed=seed)
    done("track")
    lines = timer.run("sketch", steps.sketch, frames)
    grow = np.ones((3, 3), np.uint8)
    sketches = np.stack([lines * np.stack([cv2.dilate(m.astype(np.uint8), grow) for m in mask]) for mask in layers.masks])
    done("sketch")
    return Curated(frames, layers, labels, kept, sketches.astype(np.float32),
                   frame_motion_scores(flow.magnitude, 75.0))


# ------------------------------------------------------------------------------------------ files


def find_videos(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    videos = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(source).parts))
    if not videos:
        raise LayerkitError(f"no videos found in '{source}' (looked for {', '.join(VIDEO_SUFFIXES)}).")
    return videos


def check_paths(source: Path, output: Path) -> None:
    if not source.exists():
        raise LayerkitError(f"input '{source}' does not exist.")
    src, out = source.resolve(), output.resolve()
    if out == src or (source.is_dir() and src in out.parents):
        raise LayerkitError(f"output '{output}' lies inside input '{source}'; choose an output outside it, "
                            "so curated clips are never read back as input.")
    if output.exists() and not output.is_dir():
        raise LayerkitError(f"output '{output}' exists and is a file, not a directory.")


def clip_id(source: Path, video: Path, start: int) -> str:
    rel = video.name if source.is_file() else str(video.relative_to(source))
    stem = rel[: -len(video.suffix)] if video.suffix else rel
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem.replace(os.sep, "__"))
    return f"{safe}_{start:05d}"


def caption(video: Path) -> str | None:
    """A caption beside the video: ``<name>.txt`` (its text, stripped), or None."""
    side = video.with_suffix(".txt")
    if side.is_file():
        text = side.read_text(errors="replace").strip()
        return text or None
    return None


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def prepare(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """RGB uint8 frames (alpha dropped), resized so the short side is ``short_side`` when given."""
    frames = np.ascontiguousarray(frames[..., :3])
    if not short_side:
        return frames
    h, w = frames.shape[1:3]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return frames
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])


# ------------------------------------------------------------------------------------------ the run


class _Bars:
    """One tqdm bar per stage on stderr ("read" counts videos, the others clips); off when stderr
    is not a terminal."""

    def __init__(self, videos: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bars = {s: tqdm(total=videos if s == "read" else 0, desc=f"{s:<7}", unit="video" if s == "read" else "clip",
                             position=i, leave=True, file=sys.stderr, disable=None if enabled else True,
                             dynamic_ncols=True)
                     for i, s in enumerate(STAGES)}

    def add_clips(self, count: int) -> None:
        for stage, bar in self.bars.items():
            if stage != "read":
                bar.total += count
                bar.refresh()

    def done(self, stage: str, timer: Timer | None = None) -> None:
        bar = self.bars[stage]
        bar.update(1)
        if timer is not None:
            bar.set_postfix_str(f"{timer.seconds[stage]:.1f}s", refresh=False)

    def skip_rest(self, after: str | None) -> None:
        """A clip left the pipeline (dropped or already there): advance the stages it will not reach."""
        later = STAGES[STAGES.index(after) + 1 :] if after else STAGES[1:]
        for stage in later:
            self.bars[stage].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def curate(cfg: Any, registry: Any) -> dict[str, Any]:
    """Run ``layerkit curate`` for the composed ``cfg`` (``cfg.input``, ``cfg.output``). Returns the summary."""
    from layerkit.config import to_plain
    from layerkit.io.video import read_video
    from layerkit.runs import write_record

    source, output = Path(str(cfg.input)).expanduser(), Path(str(cfg.output)).expanduser()
    check_paths(source, output)
    videos = find_videos(source)
    single = source.is_file()
    c = cfg.clip
    num_frames, stride = int(c.num_frames), int(c.stride)
    if num_frames < 2 or stride < 1:
        raise LayerkitError(f"clip.num_frames must be at least 2 and clip.stride at least 1, got {num_frames} and {stride}.")
    need = (num_frames - 1) * stride + 1
    steps = build_steps(cfg, registry)  # bad weights fail here, before anything is written
    staging_root = output / STAGING
    summary: dict[str, Any] = {"videos": len(videos), "clips_in": 0, "kept": 0, "written": 0, "resumed": 0,
                               "dropped": 0, "dropped_by": Counter(), "frames": 0, "seconds": 0.0}
    timer = Timer()
    bars = _Bars(len(videos), bool(cfg.get("progress", True)))
    start_time = time.perf_counter()
    try:
        for video in videos:
            first = clip_id(source, video, 0)
            if not single and _unusable_before(output, first, cfg):  # unreadable or too short last time
                summary["clips_in"] += 1
                _resume(output, first, summary)
                bars.done("read")
                continue
            try:
                clip = timer.run("read", read_video, video, bits=8)  # the curation models work on 8-bit frames
                frames = clip.frames
                if len(frames) < need:
                    raise LayerkitError(f"video '{video}' has {len(frames)} frames; a clip needs {need} "
                                        f"(clip.num_frames={num_frames}, clip.stride={stride}).")
            except LayerkitError as exc:
                if single:
                    raise
                kind = "too short" if "a clip needs" in str(exc) else "unreadable"
                _drop(output, clip_id(source, video, 0), kind, str(exc), summary)
                summary["clips_in"] += 1
                bars.done("read")
                continue
            bars.done("read", timer)
            starts = list(range(0, len(frames) - need + 1, need))
            if c.get("max_per_video") is not None:
                starts = starts[: int(c.max_per_video)]
            bars.add_clips(len(starts))
            prompt = caption(video)
            for start in starts:
                summary["clips_in"] += 1
                cid = clip_id(source, video, start)
                if _already_done(output, cid, cfg):
                    _resume(output, cid, summary)
                    bars.skip_rest(None)
                    continue
                chunk = prepare(frames[start : start + need : stride], c.get("short_side"))
                reached = [None]

                def on_stage(stage: str, reached=reached) -> None:
                    reached[0] = stage
                    bars.done(stage, timer)

                result = curate_frames(chunk, steps, cfg, seed=int(cfg.seed) + zlib.crc32(cid.encode()),
                                       timer=timer, on_stage=on_stage)
                summary["frames"] += len(chunk)
                if isinstance(result, Dropped):
                    _drop(output, cid, result.kind, result.reason, summary)
                    bars.skip_rest(reached[0])
                    continue
                manifest = {"id": cid, "prompt": prompt,
                            "source": {"path": str(video.relative_to(source)) if not single else video.name,
                                       "start_frame": start, "stride": stride, "source_fps": clip.fps},
                            "frame_motion_scores": [float(s) for s in result.frame_motion_scores],
                            "steps": steps.configs, "merge": to_plain(cfg.merge),
                            "layerkit_version": _version()}
                fps = clip.fps / stride
                timer.run("write", _write, output, staging_root, cid, result, manifest, fps, cfg)
                bars.done("write", timer)
                summary["kept"] += 1
                summary["written"] += 1
    finally:
        bars.close()
        shutil.rmtree(staging_root, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - start_time
    summary["stage_seconds"] = {k: round(v, 3) for k, v in timer.seconds.items()}
    summary["dropped_by"] = dict(summary["dropped_by"])
    output.mkdir(parents=True, exist_ok=True)
    write_record(output, command="curate", config=to_plain(cfg), seed=int(cfg.seed), files=_clip_dirs(output),
                 extra={"summary": summary})
    return summary


def _version() -> str:
    from layerkit import __version__

    return __version__


def _clip_dirs(output: Path) -> list[str]:
    return sorted(p.name for p in output.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def _already_done(output: Path, cid: str, cfg: Any) -> bool:
    if cfg.get("overwrite"):
        return False
    if (output / cid / MANIFEST).is_file():
        return True
    return (output / DROPPED / f"{cid}.json").is_file() and not cfg.get("retry_dropped")


def _unusable_before(output: Path, cid: str, cfg: Any) -> bool:
    record = output / DROPPED / f"{cid}.json"
    if cfg.get("overwrite") or cfg.get("retry_dropped") or not record.is_file():
        return False
    return json.loads(record.read_text()).get("kind") in ("unreadable", "too short")


def _resume(output: Path, cid: str, summary: dict[str, Any]) -> None:
    """Count a clip an earlier run already settled (written, or dropped and why)."""
    summary["resumed"] += 1
    if (output / cid / MANIFEST).is_file():
        summary["kept"] += 1
        return
    earlier = json.loads((output / DROPPED / f"{cid}.json").read_text())
    summary["dropped"] += 1
    summary["dropped_by"][f"{earlier.get('kind', 'dropped')} (earlier run)"] += 1


def _drop(output: Path, cid: str, kind: str, reason: str, summary: dict[str, Any]) -> None:
    summary["dropped"] += 1
    summary["dropped_by"][kind] += 1
    _atomic_json(output / DROPPED / f"{cid}.json", {"id": cid, "kind": kind, "reason": reason})


def _write(output: Path, staging_root: Path, cid: str, result: Curated, manifest: dict[str, Any], fps: float,
           cfg: Any) -> None:
    from layerkit_plugins.curation.preview import write_clip_preview

    staging = staging_root / f"{cid}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # the output folder itself is made here, by the first clip
    staging.mkdir(parents=True)
    try:
        write_clip(staging, frames=result.frames, fps=fps, layer_masks=result.layers.masks,
                   layer_scores=result.layers.scores, layer_elements=result.layers.elements,
                   element_labels=result.labels if cfg.get("elements", True) else None,
                   element_scores=result.layers.element_scores, tracks=result.tracks, sketches=result.sketches,
                   manifest=manifest, frames_format=str(cfg.clip.get("frames_format", "mp4")))
        if cfg.get("preview", True):
            write_clip_preview(staging / "preview.png", result.frames, result.layers.masks, result.layers.scores,
                               result.tracks.tracks, result.tracks.layer)
            files = json.loads((staging / MANIFEST).read_text())
            files["files"]["preview"] = "preview.png"
            (staging / MANIFEST).write_text(json.dumps(files, indent=2))
        target = output / cid
        if target.exists():  # overwrite=true: replace the old clip
            old = staging_root / f"{cid}.{os.getpid()}.old"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        stale = output / DROPPED / f"{cid}.json"
        if stale.exists():
            stale.unlink()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def format_summary(summary: dict[str, Any], output: Path) -> str:
    lines = [f"curate: {summary['videos']} video(s), {summary['clips_in']} clip(s) in: {summary['kept']} kept "
             f"({summary['written']} written, {summary['resumed']} already done), {summary['dropped']} dropped"]
    for kind, count in sorted(summary["dropped_by"].items()):
        lines.append(f"  dropped {count}: {kind}")
    if summary["dropped"]:
        lines.append(f"  reasons per clip: {output / DROPPED}/<clip id>.json")
    if summary["frames"]:
        lines.append(f"  {summary['frames']} frames curated in {summary['seconds']:.1f}s "
                     f"({summary['frames'] / max(summary['seconds'], 1e-9):.1f} frames/s)")
    lines.append(f"output: {output}")
    return "\n".join(lines)
