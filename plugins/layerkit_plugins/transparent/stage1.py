"""``transparent.image``: Layer-Animate's stage 1 for ``transparent.t2v`` (seed 003, sec. 3), a
sampling stage.

Before stage 2 animates anything, the prompt becomes one transparent image: the backbone's
SD 1.5 image UNet with LayerDiffuse's transparent attention samples a transparent latent,
and the VAE plus the transparent decoder turn it into RGBA
(:meth:`layerkit_plugins.animatediff.backbone.AnimateDiff.generate_images`, through layerkit's
one sampling loop). That image is stage 2's clean middle frame.

The stage runs after the parts are built, on the run's device and dtype (the core places the
backbone before any stage runs, with its memory options). Samples marked ``stage1`` without a
``reference`` get one [4, H, W] in [0, 1]; sample i draws from the run's seed + i, so each
image is repeatable on its own. The ``transparent_t2v`` task config adds it as ``stages.image``.
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit.protocols import Stage


class TransparentImageStage(Stage):
    name = "image"

    def __init__(self, steps: int = 25, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: str = "", scheduler: str | None = None, seed: int = 0) -> None:
        self.steps, self.guidance_scale, self.guidance_rescale = int(steps), float(guidance_scale), float(guidance_rescale)
        self.negative_prompt, self.scheduler, self.seed = str(negative_prompt), scheduler, int(seed)

    def run(self, parts: Any, batch: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
            generator: torch.Generator | None = None, progress: bool = False) -> dict[str, Any]:
        flags = batch.get("stage1")
        if flags is None or "reference" in batch:
            return batch
        backbone = parts.backbone
        if not callable(getattr(backbone, "generate_images", None)):
            raise LayerkitError(f"stage 1 of transparent.t2v needs a backbone with an image stage (animatediff); "
                                f"{type(backbone).__name__} has none.")
        prompts = list(batch["prompt"])
        index = batch.get("sample_index")
        images = []
        for i, prompt in enumerate(prompts):
            k = int(index[i]) if index is not None else i
            gen = torch.Generator("cpu").manual_seed(self.seed + k)
            image = backbone.generate_images(
                [prompt], height=_first(batch["height"]), width=_first(batch["width"]), steps=self.steps,
                guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                negative_prompt=self.negative_prompt, scheduler=self.scheduler, generator=gen, progress=progress,
            )[0]
            images.append(image.float().cpu())
        return {**batch, "reference": torch.stack(images)}


def _first(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.flatten()[0])
    if isinstance(value, list | tuple):
        return int(value[0])
    return int(value)
