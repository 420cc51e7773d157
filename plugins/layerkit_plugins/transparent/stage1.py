"""``transparent.stage1``: Layer-Animate's stage 1 for ``transparent.t2v`` (seed 003, sec. 3).

Before stage 2 animates anything, the prompt becomes one transparent image: the backbone's
SD 1.5 image UNet with LayerDiffuse's transparent attention samples a transparent latent,
and the VAE plus the transparent decoder turn it into RGBA
(:meth:`layerkit_plugins.animatediff.backbone.AnimateDiff.generate_images`). That image is
stage 2's clean middle frame.

It is a control because a control is the part of a layerkit run that holds the backbone and
prepares each sample before sampling: ``prepare`` turns a t2v sample (``stage1`` set, no
``reference``) into one with ``reference`` [4, H, W] in [0, 1]. Samples that already carry a
reference (a user's image) or a training clip (``rgba``) pass through untouched; the learned
part (``forward``) is empty. The ``transparent_t2v`` task config adds it as
``controls.stage1``.
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError
from layerkit.protocols import Backbone, Control

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class TransparentStage1(Control):
    """Prompt -> transparent middle frame, run in ``prepare`` on every t2v sample."""

    name = "stage1"
    inputs = ()

    def __init__(self, backbone: Backbone, steps: int = 25, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, negative_prompt: str = "", scheduler: str | None = None,
                 seed: int = 0, device: str = "auto", dtype: str = "fp32", offload: bool = False,
                 progress: bool = False) -> None:
        super().__init__()
        if not callable(getattr(backbone, "generate_images", None)):
            raise LayerkitError(
                f"stage 1 of transparent.t2v needs a backbone with an image stage (animatediff); "
                f"{type(backbone).__name__} has none."
            )
        if dtype not in DTYPES:
            raise LayerkitError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}.")
        self.__dict__["backbone"] = backbone  # the run's backbone, not a submodule of this control
        self.steps, self.guidance_scale, self.guidance_rescale = int(steps), float(guidance_scale), float(guidance_rescale)
        self.negative_prompt, self.scheduler, self.seed = str(negative_prompt), scheduler, int(seed)
        self.device_name, self.dtype, self.offload, self.progress = str(device), DTYPES[dtype], bool(offload), bool(progress)

    def _device(self) -> torch.device:
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            raise LayerkitError(f"device '{self.device_name}' was asked for but CUDA is not available on this machine.")
        return torch.device(self.device_name)

    def needs_image(self, sample: dict[str, Any]) -> bool:
        return bool(sample.get("stage1")) and "reference" not in sample and "rgba" not in sample

    def prepare(self, sample: dict[str, Any]) -> dict[str, Any]:
        if not self.needs_image(sample):
            return sample
        backbone = self.backbone
        param = next(backbone.parameters())
        home = (param.device, param.dtype)
        device = self._device()
        # the sampler moves and casts the backbone next anyway; stage 1 runs where it will
        backbone.to(device=device, dtype=self.dtype)
        generator = torch.Generator("cpu").manual_seed(self.seed + int(sample.get("sample_index", 0)))
        try:
            image = backbone.generate_images(
                [sample["prompt"]], height=int(sample["height"]), width=int(sample["width"]), steps=self.steps,
                guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                negative_prompt=self.negative_prompt, scheduler=self.scheduler, generator=generator,
                progress=self.progress,
            )[0]
        finally:
            if self.offload:  # CPU offload wanted: leave nothing on the accelerator
                backbone.to(device=home[0])
        return {**sample, "reference": image.float().cpu()}

    def forward(self, *args: Any, **kwargs: Any) -> None:
        return None
