"""Cut detection: a clip that holds a cut is dropped.

- ``motion_coherence`` (seed 000 sec. 3.3): the frame motion score is the 75th percentile of the
  flow magnitude in each frame; a frame-to-frame change of it above ``eta_f`` (px/frame, at the
  curated resolution; the paper: 85) marks a cut. It reuses the flow the merging needs.
- ``scenedetect``: PySceneDetect's content detector (HSV change between frames; ``threshold``
  27 is its default) on the clip's frames. Needs the optional extra: ``pip install layerkit[curate]``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.flow import Flow
from layerkit_plugins.curation.merge import frame_motion_scores
from layerkit_plugins.curation.steps import check_frames


@dataclass
class CutReport:
    """``cuts``: first frame of each new shot found; ``reason``: one sentence when there are any."""

    cuts: list[int] = field(default_factory=list)
    reason: str | None = None
    values: list[float] = field(default_factory=list)


class MotionCoherenceCut:
    """The paper's motion-coherence rule."""

    role = "cuts"

    def __init__(self, eta_f: float = 85.0, percentile: float = 75.0) -> None:
        if eta_f <= 0 or not 0 < percentile <= 100:
            raise LayerkitError(f"motion coherence needs eta_f > 0 and 0 < percentile <= 100, got {eta_f}, {percentile}.")
        self.eta_f, self.percentile = float(eta_f), float(percentile)

    def __call__(self, frames: np.ndarray, flow: Flow) -> CutReport:
        scores = frame_motion_scores(flow.magnitude, self.percentile)
        jumps = np.abs(np.diff(scores))
        cuts = [int(i) + 1 for i in np.flatnonzero(jumps > self.eta_f)]  # flow index i+1 spans frames i+1 -> i+2
        reason = None
        if cuts:
            worst = float(jumps.max())
            reason = (f"motion coherence: the {self.percentile:g}th-percentile flow jumps by {worst:.2f} px "
                      f"(> eta_f {self.eta_f:g}) at frame {cuts[0]}")
        return CutReport(cuts, reason, [float(s) for s in scores])


class SceneDetectCut:
    """PySceneDetect's ``ContentDetector`` over the frames (``min_scene_len`` in frames)."""

    role = "cuts"

    def __init__(self, threshold: float = 27.0, min_scene_len: int = 2, luma_only: bool = False) -> None:
        try:
            import scenedetect  # noqa: F401
        except ImportError:
            raise LayerkitError("cut detection with PySceneDetect needs the optional package scenedetect: "
                                "pip install 'layerkit[curate]' (or remove cuts.scenedetect).") from None
        self.threshold, self.min_scene_len, self.luma_only = float(threshold), int(min_scene_len), bool(luma_only)

    def __call__(self, frames: np.ndarray, flow: Flow | None = None) -> CutReport:
        import cv2
        from scenedetect import ContentDetector

        frames = check_frames(frames)
        detector = ContentDetector(threshold=self.threshold, min_scene_len=self.min_scene_len,
                                   luma_only=self.luma_only)
        takes_timecode = "timecode" in inspect.signature(detector.process_frame).parameters
        cuts: list[int] = []
        for t, frame in enumerate(frames):
            when = _timecode(t) if takes_timecode else t
            found = detector.process_frame(when, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            cuts.extend(int(getattr(c, "frame_num", c)) for c in found or [])
        cuts = sorted({c for c in cuts if 0 < c < len(frames)})
        reason = f"PySceneDetect: a content cut at frame {cuts[0]} (threshold {self.threshold:g})" if cuts else None
        return CutReport(cuts, reason)


def _timecode(frame: int):
    from scenedetect import FrameTimecode

    return FrameTimecode(frame, fps=24.0)
