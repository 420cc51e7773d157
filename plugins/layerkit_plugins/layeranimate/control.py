"""``layeranimate.layer_controlnet``: LayerAnimate's layer-level control (Yang et al. 2025, sec. 4.1-4.3)
as a layerkit control.

``prepare`` (non-learned, in the data loader): one sample of the schema in ``schema.py`` in the
released loader's layout (two keyframes for every mode, so batches may mix i2v and interpolation)
without its variable-length tracks (already drawn into the trajectory map).

``forward`` (every denoiser call, on every guidance row with that row's text and image tokens, as
the authors' pipeline runs it): frame decomposition (layer region = mask x keyframe) through the
backbone's VAE, masks resized to latent size, motion-based assignment of regions to frames
(static layers repeat, dynamic layers are zero elsewhere), sketch videos through the VAE, then the
Layer ControlNet (each layer its own sample; the noisy latent is not read). It provides
``layer_features``: the ControlNet's features after every encoder block with spatial attention,
[R, N, F, C, h, w], and the layers' validity [R, N], which ``layeranimate.fusion`` reads.

What does not depend on the step (the VAE latents of regions and sketches) is computed once per
sampling run and for one guidance half only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit.protocols import Backbone, Control, Step

LAYER_INPUTS = ("keyframes", "layer_masks", "layer_validity", "layer_static", "motion_scores", "trajectory", "sketch",
                "mode")


def load_layer_controlnet(path: str | Path, *, dtype: torch.dtype | None = None) -> Any:
    """The authors' ``layer_controlnet/`` folder (config.json + weights), strictly: a missing or an
    unexpected key is one sentence naming it."""
    from layerkit_plugins.layeranimate.controlnet import LayerControlNet

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LayerkitError(f"Layer ControlNet folder '{path}' does not exist or has no config.json "
                            "(LayerAnimate's layer_controlnet/ is expected).")
    try:
        net, info = LayerControlNet.from_pretrained(str(path), output_loading_info=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LayerkitError(f"Layer ControlNet folder '{path}' could not be loaded: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            first = info[kind][0]
            raise LayerkitError(f"Layer ControlNet folder '{path}' has {len(info[kind])} {kind.replace('_', ' ')} "
                                f"(first: {first}).")
    return net.to(dtype) if dtype is not None else net


class LayerControl(Control):
    inputs = LAYER_INPUTS
    provides = ("layer_features",)

    def __init__(self, backbone: Backbone, path: str | None = None, capacity: int = 4, layer_chunk: int | None = None,
                 trainable: bool = True, controlnet: dict[str, Any] | None = None,
                 motion_assignment: bool = True) -> None:
        """``path``: the authors' ``layer_controlnet/`` folder; without it the ControlNet is a copy of
        the backbone UNet's encoder (the paper's initialisation) with zero-initialised control
        encoders. ``layer_chunk``: layers per ControlNet call (memory; the same result).
        ``controlnet``: config fields for the copy (e.g. ``trajectory_block_out_channels``).
        ``motion_assignment=False`` is the paper's ablation "w/o MA" (Tab. 2): every layer is treated
        as dynamic (its region only on the keyframes, zeros elsewhere), whatever ``layer_static`` says."""
        super().__init__()
        from layerkit_plugins.layeranimate.controlnet import LayerControlNet

        if not hasattr(backbone.denoiser, "output_blocks"):
            raise LayerkitError(f"layeranimate.layer_controlnet needs the tooncrafter backbone; "
                                f"{type(backbone).__name__} has no ToonCrafter UNet.")
        self.controlnet = load_layer_controlnet(path) if path else \
            LayerControlNet.from_unet(backbone.denoiser, **(controlnet or {}))
        self.capacity, self.layer_chunk = int(capacity), layer_chunk
        self.motion_assignment = bool(motion_assignment)
        self.controlnet.requires_grad_(bool(trainable))
        self._memo: tuple[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # -- non-learned: in the data loader ----------------------------------------------------
    def prepare(self, sample: dict[str, Any]) -> dict[str, Any]:
        from layerkit_plugins.layeranimate.schema import two_keyframes

        missing = [k for k in LAYER_INPUTS if k not in sample]
        if missing:
            raise LayerkitError(f"layeranimate.layer_controlnet needs {missing} in every sample (a LayerAnimate "
                                "dataset, demo folder or shapes-world sample gives them).")
        n = sample["layer_validity"].shape[0]
        if n != self.capacity:
            raise LayerkitError(f"the sample has {n} layer slots but the layer capacity is {self.capacity}; pad "
                                "the layers to controls.layers.capacity.")
        out = two_keyframes(sample) if sample["keyframes"].shape[0] == 1 else dict(sample)
        out.pop("tracks", None)  # drawn into the trajectory map; their number differs per sample
        out.pop("track_layer", None)
        return out

    # -- learned: on every denoiser call ----------------------------------------------------
    def layer_inputs(self, step: Step, backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer_latents [R, N, F, 4, h, w], layer_latent_mask [R, N, F, 1, h, w], sketch latents
        [R, N, F, 4, h, w]), from one guidance half and kept for the next steps of the same batch."""
        ex = step.extras
        key = (id(ex["keyframes"]), ex["keyframes"].data_ptr(), step.rows)
        if self._memo is not None and self._memo[0] == key and not torch.is_grad_enabled():
            return self._memo[1]
        b = step.rows // step.copies
        with torch.no_grad():
            out = self._encode({k: (v[:b] if isinstance(v, torch.Tensor) else v[:b]) for k, v in
                                ((k, ex[k]) for k in LAYER_INPUTS)}, backbone, step.noisy.shape[2])
        out = tuple(torch.cat([t] * step.copies) for t in out)
        self._memo = (key, out)
        return out

    def _encode(self, ex: dict[str, Any], backbone: Backbone, num_frames: int):
        from layerkit_plugins.layeranimate.layers import latent_masks, layer_regions, motion_based_assignment

        keyframes, masks = ex["keyframes"].float(), ex["layer_masks"].float()  # [B, K, 3, H, W], [B, N, K, 1, H, W]
        b, n, k = masks.shape[:3]
        regions = layer_regions(keyframes, masks)  # [B, N, K, 3, H, W] in [-1, 1]
        latents = backbone.encode_video(regions.flatten(0, 1))  # [B*N, 4, K, h, w]
        h, w = latents.shape[-2:]
        region_latents = latents.permute(0, 2, 1, 3, 4).unflatten(0, (b, n))  # [B, N, K, 4, h, w]
        mask_latents = latent_masks(masks, (h, w)).to(region_latents.dtype)
        modes = list(ex["mode"]) if not isinstance(ex["mode"], str) else [ex["mode"]] * b
        static = ex["layer_static"].bool()
        if not self.motion_assignment:  # the ablation: no layer repeats over the frames
            static = torch.zeros_like(static)
        layer_latents, layer_mask = motion_based_assignment(region_latents, mask_latents, static, num_frames, modes)
        sketch = ex["sketch"].float()  # [B, N, F, 3, H, W] in [0, 1], white = no sketch
        sketch_latents = backbone.encode_video(sketch.flatten(0, 1) * 2 - 1)  # [B*N, 4, F, h, w]
        sketch_latents = sketch_latents.permute(0, 2, 1, 3, 4).unflatten(0, (b, n))
        return layer_latents, layer_mask, sketch_latents

    def forward(self, step: Step, backbone: Backbone) -> dict[str, Any]:
        layer_latents, layer_mask, sketch = self.layer_inputs(step, backbone)
        cond, ex = step.cond, step.extras
        dtype = self.controlnet.dtype
        features = self.controlnet(
            step.timesteps, cond["prompt_embeds"].to(dtype), cond.get("image_embeds"), cond.get("fps"),
            layer_latents.to(dtype), layer_mask.to(dtype), ex["motion_scores"].to(layer_latents.device, dtype),
            sketch.to(dtype), ex["trajectory"].to(layer_latents.device, dtype), layer_chunk=self.layer_chunk)
        return {"layer_features": {"features": features, "validity": ex["layer_validity"]}}
