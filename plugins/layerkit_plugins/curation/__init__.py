"""Layer curation (LayerAnimate seed 001 sec. 3, seed 000 sec. 3.3): ``layerkit curate`` and its
steps. Every step has a default that needs no weights and runs on CPU, and a stronger model that
loads from a local path. ``read_clip`` reads what the command writes (docs/curation.md)."""

from __future__ import annotations

from layerkit import hookimpl

_STEPS = "layerkit_plugins.curation"


@hookimpl
def register_curation_steps(register):
    register("segment.colour_motion", f"{_STEPS}.segment:ColourMotionSegmenter",
             description="flat-colour regions on key frames every 4 frames, propagated by flow with colour "
                         "re-labelling, new elements at later key frames; same-colour elements that move alike joined")
    register("segment.sam2", f"{_STEPS}.sam2:Sam2Segmenter",
             description="SAM 2 (transformers Sam2Model + Sam2VideoModel, local weights): automatic masks on key "
                         "frames every 4 frames, video propagation, new elements added until none is new")
    register("flow.opencv", f"{_STEPS}.flow:OpenCVFlow",
             description="OpenCV DIS (default) or Farneback dense optical flow on CPU")
    register("flow.raft", f"{_STEPS}.flow:RaftFlow",
             description="torchvision RAFT (large or small) from a local weights file")
    register("track.lucas_kanade", f"{_STEPS}.track:LucasKanadeTracker",
             description="OpenCV pyramidal Lucas-Kanade on a grid with a forward-backward visibility check")
    register("track.cotracker3", f"{_STEPS}.track:CoTracker3Tracker",
             description="CoTracker3 from a local co-tracker checkout and checkpoint")
    register("sketch.canny", f"{_STEPS}.sketch:CannySketch",
             description="classical line extractor: Canny edges of every colour channel")
    register("sketch.lineart", f"{_STEPS}.sketch:LineArtSketch",
             description="the informative-drawings line-art generator from a local sk_model.pth")
    register("cuts.motion_coherence", f"{_STEPS}.cuts:MotionCoherenceCut",
             description="LayerAnimate's rule: a jump of the 75th-percentile flow magnitude above eta_f is a cut")
    register("cuts.scenedetect", f"{_STEPS}.cuts:SceneDetectCut",
             description="PySceneDetect's content detector (optional extra layerkit[curate])")


@hookimpl
def register_commands(register):
    register("curate", f"{_STEPS}.cli:main",
             description="turn videos into layered training clips (masklets, motion scores, tracks, sketches)")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.curation.conf")


def read_clip(path):
    """Read a curated clip directory (see :func:`layerkit_plugins.curation.clip.read_clip`)."""
    from layerkit_plugins.curation.clip import read_clip as _read

    return _read(path)
