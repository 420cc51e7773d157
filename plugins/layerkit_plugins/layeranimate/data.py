"""LayerAnimate training data: ``layeranimate.shapes`` (shapes-world clips with every control, the
paper's training-time choices applied: 10% layer-mask dropout, one control per kept layer drawn
20/40/40 motion score / trajectory / sketch, i2v vs interpolation 50/50, horizontal flip 0.5).

Item i is the same every epoch (its choices come from a generator seeded by the item), so a run
resumes exactly and latents may be cached.
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError


class ShapesLayers(torch.utils.data.Dataset):
    cacheable = False  # the control encodes regions and sketches itself; nothing for the latent cache

    def __init__(self, size: int = 1024, seed: int = 0, split: str = "train", capacity: int = 4, fps: int = 8,
                 num_frames: int = 16, height: int = 64, width: int = 64, num_sprites: int = 2,
                 choices: bool = True, **config: Any) -> None:
        from layerkit.data.shapes import ShapesConfig, seed_for

        if size < 1:
            raise LayerkitError(f"layeranimate.shapes needs a positive size; got {size}.")
        seed_for(split, seed, 0)
        if num_sprites + 1 > capacity:
            raise LayerkitError(f"num_sprites={num_sprites} plus the background is more layers than the capacity "
                                f"{capacity}.")
        self.config = ShapesConfig(num_frames=num_frames, height=height, width=width, num_sprites=num_sprites,
                                   **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        self.config.validate()
        self.size, self.seed, self.split = size, seed, split
        self.capacity, self.fps, self.choices = capacity, fps, bool(choices)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        from layerkit.data.shapes import seed_for
        from layerkit_plugins.layeranimate.shapes import shapes_layeranimate_sample, shapes_training_sample

        if not 0 <= index < self.size:
            raise IndexError(f"layeranimate.shapes index {index} out of range for size {self.size}.")
        world = seed_for(self.split, self.seed, index)
        generator = torch.Generator().manual_seed(world % (2**63))
        if self.choices:
            sample = shapes_training_sample(world, generator, capacity=self.capacity, config=self.config, fps=self.fps)
        else:
            sample = shapes_layeranimate_sample(world, mode="i2v", generator=generator, capacity=self.capacity,
                                                config=self.config, fps=self.fps)
        sample.pop("ground_truth", None)
        return sample


class CuratedClips(torch.utils.data.Dataset):
    """``layeranimate.folder``: the clips ``layerkit curate`` writes (docs/curation.md): every directory
    under ``root`` with a ``manifest.json``. A clip's frames are resized (shorter side) and centre-cropped
    to ``height`` x ``width`` as the authors' loader does, ``num_frames`` frames taken evenly over it; its
    layers (COCO-RLE masklets), motion scores (px/frame, normalised by ``max_score`` at the curated size),
    tracks and sketches become a LayerAnimate sample with the paper's training choices (``choices``)."""

    cacheable = False

    def __init__(self, root: str, num_frames: int = 16, height: int = 320, width: int = 512, capacity: int = 4,
                 choices: bool = True, seed: int = 0, max_score: float = 30.0, static_threshold: float = 0.1,
                 fps: int | None = None) -> None:
        from pathlib import Path

        self.root = Path(str(root))
        if not self.root.is_dir():
            raise LayerkitError(f"layeranimate.folder root '{root}' is not a directory (the OUTPUT of layerkit curate).")
        self.clips = sorted(p.parent for p in self.root.rglob("manifest.json") if not p.parent.name.startswith("."))
        if not self.clips:
            raise LayerkitError(f"layeranimate.folder root '{root}' holds no curated clip (a directory with "
                                "manifest.json, as layerkit curate writes).")
        self.num_frames, self.height, self.width, self.capacity = num_frames, height, width, capacity
        self.choices, self.seed, self.fps = bool(choices), int(seed), fps
        self.max_score, self.static_threshold = float(max_score), float(static_threshold)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import torchvision.transforms.functional as TF

        from layerkit_plugins.curation import read_clip
        from layerkit_plugins.layeranimate.controls import apply_training_choices, draw_training_choices
        from layerkit_plugins.layeranimate.schema import build_sample
        from layerkit_plugins.layeranimate.trajectory import fit_tracks

        path = self.clips[index]
        clip = read_clip(path)
        frames = clip["frames"]
        total = frames.shape[0]
        if total < self.num_frames:
            raise LayerkitError(f"curated clip '{path}' has {total} frames; data.num_frames is {self.num_frames}.")
        pick = torch.linspace(0, total - 1, self.num_frames).round().long()
        src_h, src_w = frames.shape[-2:]
        short = min(self.height, self.width)

        def fit(x: torch.Tensor, mode: TF.InterpolationMode) -> torch.Tensor:
            return TF.center_crop(TF.resize(x, short, interpolation=mode, antialias=True), [self.height, self.width])

        video = fit(frames[pick], TF.InterpolationMode.BILINEAR).clamp(0, 1)
        masks = clip["layer_masks"][:, pick]  # [n, F, 1, h, w]
        n = masks.shape[0]
        masks = (fit(masks.flatten(0, 1), TF.InterpolationMode.BILINEAR) > 0.5).float().unflatten(0, (n, self.num_frames))
        lines = fit(clip["sketches"][:, pick].flatten(0, 1), TF.InterpolationMode.BILINEAR).unflatten(0, (n, self.num_frames))
        sketches = (1 - lines).clamp(0, 1).expand(-1, -1, 3, -1, -1)
        tracks = torch.from_numpy(np.asarray(fit_tracks(clip["tracks"][pick].numpy(), src_h, src_w, self.height,
                                                        self.width)))[..., :2]
        scale = short / min(src_h, src_w)
        scores = clip["motion_scores"] * scale  # px/frame at the training size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        choices = draw_training_choices(generator, self.capacity) if self.choices else None
        sample = build_sample(video, masks, scores, mode=choices.mode if choices else "i2v",
                              prompt=clip.get("prompt") or "", fps=int(self.fps or round(clip["fps"])),
                              capacity=self.capacity, tracks=tracks, track_layer=clip["track_layer"], sketches=sketches,
                              static_threshold=self.static_threshold, max_score=self.max_score)
        return apply_training_choices(sample, choices) if choices else sample
