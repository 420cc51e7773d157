"""Optical flow steps: OpenCV DIS / Farneback (default, no weights) and torchvision RAFT (local weights).

A flow step maps frames ``uint8 [F, H, W, 3]`` (RGB) to a :class:`Flow`: ``forward[t]`` moves
frame t to frame t+1, ``backward[t]`` frame t+1 to frame t, both ``float32 [F-1, H, W, 2]`` in
pixels (dx, dy) of the frames given. Motion scores (seed 001 sec. 3.2), the motion-coherence
cut rule (seed 000 sec. 3.3), the classical segmenter's propagation and the tracker's fallback
all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from layerkit.errors import LayerkitError
from layerkit_plugins.curation.steps import check_frames, load_state_dict, resolve_device


@dataclass
class Flow:
    """Dense flow between consecutive frames: ``forward``/``backward`` float32 [F-1, H, W, 2]."""

    forward: np.ndarray
    backward: np.ndarray

    @property
    def magnitude(self) -> np.ndarray:
        """|forward| per pixel, float32 [F-1, H, W] (px/frame)."""
        return np.linalg.norm(self.forward, axis=-1)


def warp_backward(values: np.ndarray, flow: np.ndarray, *, nearest: bool = True) -> np.ndarray:
    """Sample ``values`` [H, W] (or [H, W, C]) at ``x + flow(x)``: with ``flow`` pointing from the
    target frame to the frame ``values`` belongs to, this carries them onto the target frame."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = gx + flow[..., 0], gy + flow[..., 1]
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    src = values.astype(np.float32) if values.dtype not in (np.uint8, np.float32) else values
    out = cv2.remap(src, map_x, map_y, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(values.dtype)


class OpenCVFlow:
    """Dense flow with OpenCV on grey frames, CPU, no weights: ``dis`` (DIS, Kroeger et al. 2016) or
    ``farneback``.

    DIS starts from its ``preset`` (``ultrafast``, ``fast``, ``medium``) and then refines down to
    ``finest_scale`` (0 = full resolution, which small frames need) with ``patch_size`` /
    ``patch_stride``; ``None`` keeps the preset's value. ``min_size`` (px, 0 = off) upsamples frames
    whose short side is smaller before estimating and scales the flow back.
    """

    role = "flow"
    PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}

    def __init__(self, method: str = "dis", preset: str = "medium", finest_scale: int | None = 0,
                 patch_size: int | None = 8, patch_stride: int | None = 4, min_size: int = 0) -> None:
        if method not in ("dis", "farneback"):
            raise LayerkitError(f"flow.method must be 'dis' or 'farneback', got '{method}'.")
        if preset not in self.PRESETS:
            raise LayerkitError(f"flow.preset must be one of {', '.join(self.PRESETS)}, got '{preset}'.")
        self.method, self.preset, self.min_size = method, preset, int(min_size)
        self.finest_scale, self.patch_size, self.patch_stride = finest_scale, patch_size, patch_stride

    def _pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.method == "farneback":
            return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 5, 5, 1.1, 0)
        dis = cv2.DISOpticalFlow_create(self.PRESETS[self.preset])
        if self.finest_scale is not None:
            dis.setFinestScale(int(self.finest_scale))
        if self.patch_size is not None:
            dis.setPatchSize(int(self.patch_size))
        if self.patch_stride is not None:
            dis.setPatchStride(int(self.patch_stride))
        return dis.calc(a, b, None)

    def __call__(self, frames: np.ndarray) -> Flow:
        frames = check_frames(frames, min_frames=2)
        f, h, w = frames.shape[:3]
        scale = max(1.0, self.min_size / min(h, w)) if self.min_size else 1.0
        grey = [cv2.cvtColor(fr, cv2.COLOR_RGB2GRAY) for fr in frames]
        if scale > 1.0:
            size = (round(w * scale), round(h * scale))
            grey = [cv2.resize(g, size, interpolation=cv2.INTER_CUBIC) for g in grey]
        fwd, bwd = [], []
        for t in range(f - 1):
            for out, (a, b) in ((fwd, (grey[t], grey[t + 1])), (bwd, (grey[t + 1], grey[t]))):
                flow = self._pair(a, b)
                if scale > 1.0:
                    flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_AREA) / scale
                out.append(flow)
        return Flow(np.stack(fwd).astype(np.float32), np.stack(bwd).astype(np.float32))


class RaftFlow:
    """torchvision RAFT (``raft_large`` or ``raft_small``, told apart by the weights) from a local file.

    ``path`` is a ``.pth``/``.pt`` state dict (torchvision's release files, read with
    ``weights_only=True``) or a ``.safetensors`` file. RAFT's correlation pyramid needs frames of
    at least 128 px: smaller ones are upsampled to ``min_size`` first (the flow scaled back), and
    all are padded to a multiple of 8.
    """

    role = "flow"

    def __init__(self, path: str | None = None, num_flow_updates: int = 12, batch_size: int = 8,
                 min_size: int = 128, device: str = "auto") -> None:
        import torch
        from torchvision.models.optical_flow import raft_large, raft_small

        state = load_state_dict(path, "RAFT optical flow", "flow.path")
        for name, build in (("raft_large", raft_large), ("raft_small", raft_small)):
            model = build(weights=None, progress=False)
            expected = model.state_dict()
            if set(expected) == set(state) and all(expected[k].shape == state[k].shape for k in state):
                model.load_state_dict(state)
                self.variant = name
                break
        else:
            raise LayerkitError(
                f"'{path}' holds no torchvision RAFT weights (its {len(state)} tensors match neither "
                "raft_large nor raft_small); give the file torchvision's raft_large/raft_small release."
            )
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.num_flow_updates, self.batch_size = int(num_flow_updates), max(1, int(batch_size))
        self.min_size = max(128, int(min_size))
        self._torch = torch

    def __call__(self, frames: np.ndarray) -> Flow:
        torch = self._torch
        frames = check_frames(frames, min_frames=2)
        f, h, w = frames.shape[:3]
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        scale = max(1.0, self.min_size / min(h, w))
        if scale > 1.0:
            x = torch.nn.functional.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                                                align_corners=False)
        sh, sw = x.shape[-2:]
        ph, pw = (-sh) % 8, (-sw) % 8
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
        a = torch.cat([x[:-1], x[1:]])  # forward pairs then backward pairs
        b = torch.cat([x[1:], x[:-1]])
        out = []
        with torch.inference_mode():
            for i in range(0, len(a), self.batch_size):
                pred = self.model(a[i : i + self.batch_size].to(self.device), b[i : i + self.batch_size].to(self.device),
                                  num_flow_updates=self.num_flow_updates)[-1]
                out.append(pred.float().cpu())
        flow = torch.cat(out)[:, :, :sh, :sw]
        if scale > 1.0:
            flow = torch.nn.functional.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([w / sw, h / sh]).view(1, 2, 1, 1)
        flow = flow.permute(0, 2, 3, 1).numpy()
        return Flow(np.ascontiguousarray(flow[: f - 1]), np.ascontiguousarray(flow[f - 1 :]))

