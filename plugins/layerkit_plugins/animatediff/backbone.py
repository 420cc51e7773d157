"""``animatediff``: SD 1.5 + AnimateDiff motion module (diffusers ``UNetMotionModel``) with
LayerDiffuse latent transparency, the backbone of Layer-Animate (seed 003, sec. 3).

Shapes: videos [B, F, C, H, W] in [-1, 1] with C = 3 (RGB) or 4 (straight RGB + alpha, both
in [-1, 1]); latents [B, 4, F, H/8, W/8] scaled by the VAE's 0.18215; no temporal compression.

* RGBA frames are encoded the LayerDiffuse way: the RGB composited on mid-grey goes through
  the VAE, and the offset encoder's output on ``[alpha, padded RGB]`` shifts the posterior
  mean by ``std * offset``. RGB frames take the posterior mean.
* ``decode_latents`` returns RGB, or with a transparent decoder and ``rgba_decode`` RGBA
  [B, F, 4, H, W] in [-1, 1]: VAE first, then the transparent decoder on (RGB, latent).
* ``predict`` calls ``UNetMotionModel(sample [B, C, F, h, w], t, prompt embeds repeated per
  frame)`` exactly as diffusers' ``AnimateDiffPipeline`` does; ``prepare_noise`` draws the
  pipeline's [B, C, F, h, w] noise so seeds match it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Backbone

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AnimateDiff(Backbone):
    latent_channels = 4
    memory_options = frozenset({"cpu_offload", "vae_tiling", "vae_slicing"})
    lora_prefix = "unet"

    def __init__(self, unet: nn.Module, motion_adapter: nn.Module | None, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, scheduler_config: dict[str, Any], offset_encoder: nn.Module | None = None,
                 transparent_decoder: nn.Module | None = None, decoder_tta: bool = False, rgba_decode: bool = True,
                 gradient_checkpointing: bool = False, vae_batch: int = 16) -> None:
        super().__init__()
        from diffusers import UNetMotionModel

        if not isinstance(unet, UNetMotionModel):
            if motion_adapter is None:
                raise LayerkitError("animatediff needs a motion adapter (motion_adapter=<folder or motion-module file>).")
            unet = UNetMotionModel.from_unet2d(unet, motion_adapter)
        self.denoiser = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.offset_encoder = offset_encoder
        self.transparent_decoder = transparent_decoder
        self.scheduler_config = dict(scheduler_config)
        self.decoder_tta, self.rgba_decode = bool(decoder_tta), bool(rgba_decode)
        self.vae_batch = int(vae_batch)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.requires_grad_(False)

    # -- schedule --------------------------------------------------------------------------
    def make_scheduler(self, kind: str = "train", name: str | None = None) -> Any:
        from diffusers import (
            DDIMScheduler,
            DDPMScheduler,
            DPMSolverMultistepScheduler,
            EulerDiscreteScheduler,
        )

        if kind == "train":
            return DDPMScheduler.from_config(self.scheduler_config)
        choices = {None: DDIMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
                   "euler": EulerDiscreteScheduler}
        if name not in choices:
            raise LayerkitError(f"animatediff has no sampler '{name}'; use ddim, dpm++ or euler.")
        return choices[name].from_config(self.scheduler_config)

    def prepare_noise(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """AnimateDiffPipeline.prepare_latents draws one [B, C, F, h, w] tensor: the same here."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # -- latent space ----------------------------------------------------------------------
    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise LayerkitError(f"animatediff needs height and width divisible by {f}; got {height}x{width}.")
        return height // f, width // f

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def _frames(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.split(self.vae_batch)) if self.vae_batch > 0 else [x]

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3|4, H, W] in [-1, 1] -> [B, 4, F, h, w]; 4 channels = RGBA (latent transparency)."""
        b, f, c = video.shape[:3]
        if c not in (3, 4):
            raise LayerkitError(f"animatediff encodes RGB or RGBA frames; got {c} channels.")
        param = next(self.vae.parameters())
        frames = video.flatten(0, 1).to(param.device, param.dtype)
        out = []
        for x in self._frames(frames):
            if c == 3:
                out.append(self.vae.encode(x).latent_dist.mean)
                continue
            if self.offset_encoder is None:
                raise LayerkitError(
                    "RGBA frames need the LayerDiffuse offset encoder: set backbone.transparent_encoder "
                    "to layer_sd15_vae_transparent_encoder.safetensors."
                )
            out.append(self.encode_rgba(x))
        latents = torch.cat(out) * self.scaling_factor
        return latents.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)

    def encode_rgba(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 4, H, W] straight RGBA in [-1, 1] -> unscaled transparent latent [N, 4, h, w]."""
        from layerkit_plugins.animatediff.layerdiffuse import pad_rgb

        alpha = ((x[:, 3:] + 1) / 2).clamp(0, 1)
        rgb = x[:, :3].clamp(-1, 1)
        posterior = self.vae.encode(rgb * alpha).latent_dist  # over mid-grey (0 in [-1, 1])
        padded = pad_rgb((rgb + 1) / 2, alpha)
        offset = self.offset_encoder(torch.cat([alpha, padded], dim=1).to(x.dtype))
        return posterior.mean + posterior.std * offset

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, F, h, w] -> [B, F, 3, H, W] (or RGBA [B, F, 4, H, W]) in [-1, 1]."""
        b, _, f = latents.shape[:3]
        z = (latents / self.scaling_factor).permute(0, 2, 1, 3, 4).flatten(0, 1)
        param = next(self.vae.parameters())
        out = []
        for chunk in self._frames(z.to(param.device, param.dtype)):
            pixel = self.vae.decode(chunk).sample
            if self.rgba_decode and self.transparent_decoder is not None:
                y = self.transparent_decoder.decode((pixel.clamp(-1, 1) + 1) / 2, chunk, tta=self.decoder_tta)
                pixel = torch.cat([y[:, 1:], y[:, :1]], dim=1) * 2 - 1  # [alpha, rgb] -> [rgb, alpha]
            out.append(pixel)
        return torch.cat(out).unflatten(0, (b, f))

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """CLIP last hidden state [B, L, D], tokenised as AnimateDiffPipeline.encode_prompt does."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tok.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        embeds = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds}

    # -- the denoiser ----------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        f = noisy.shape[2]
        dtype = self.denoiser.dtype
        text = cond["prompt_embeds"].to(noisy.device, dtype).repeat_interleave(f, dim=0)  # [B*F, L, D]
        out = self.denoiser(noisy.to(dtype), timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return out.to(noisy.dtype)

    def attach_points(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser, "vae": self.vae}

    # -- memory ----------------------------------------------------------------------------
    def components_for_offload(self) -> list[nn.Module]:
        order = [self.vae, self.offset_encoder, self.text_encoder, self.denoiser, self.transparent_decoder]
        return [m for m in order if m is not None]

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()


# ----------------------------------------------------------------------------------------
# factories named in the configs
# ----------------------------------------------------------------------------------------
def _transparency(encoder: str | None, decoder: str | None, allow_pickle: bool,
                  encoder_config: dict[str, Any] | None, decoder_config: dict[str, Any] | None) -> dict[str, nn.Module]:
    from layerkit_plugins.animatediff.layerdiffuse import (
        LatentTransparencyOffsetEncoder,
        TransparentDecoder,
        load_module_weights,
    )

    out: dict[str, nn.Module] = {}
    if encoder:
        out["offset_encoder"] = load_module_weights(LatentTransparencyOffsetEncoder(**(encoder_config or {})), encoder,
                                                    "LayerDiffuse transparent encoder", allow_pickle=allow_pickle)
    if decoder:
        out["transparent_decoder"] = load_module_weights(TransparentDecoder(**(decoder_config or {})), decoder,
                                                         "LayerDiffuse transparent decoder", allow_pickle=allow_pickle)
    return out


def from_pretrained(path: str | None = None, motion_adapter: str | None = None,
                    transparent_encoder: str | None = None, transparent_decoder: str | None = None,
                    decoder_tta: bool = False, rgba_decode: bool = True, scheduler: dict[str, Any] | None = None,
                    motion_adapter_config: dict[str, Any] | None = None, encoder_config: dict[str, Any] | None = None,
                    decoder_config: dict[str, Any] | None = None,
                    allow_pickle: bool = False, dtype: str = "fp32", gradient_checkpointing: bool = False,
                    vae_batch: int = 16) -> AnimateDiff:
    """SD 1.5 diffusers folder (``path``) + motion adapter (diffusers folder or original file)
    + optional LayerDiffuse transparent encoder/decoder files (published sizes unless
    ``encoder_config``/``decoder_config`` say otherwise). ``scheduler`` overrides the folder's
    scheduler config (the animatediff config sets AnimateDiff's DDIM settings)."""
    from layerkit_plugins.animatediff.loading import load_motion_adapter, load_sd15_folder

    if not path:
        raise LayerkitError("backbone 'animatediff' needs backbone.path: a local diffusers SD 1.5 folder.")
    if not motion_adapter:
        raise LayerkitError("backbone 'animatediff' needs backbone.motion_adapter: a diffusers MotionAdapter folder "
                            "or an AnimateDiff motion-module file (.safetensors, or .ckpt with allow_pickle=true).")
    if dtype not in DTYPES:
        raise LayerkitError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}.")
    parts = load_sd15_folder(path, DTYPES[dtype])
    adapter = load_motion_adapter(motion_adapter, allow_pickle=allow_pickle, config=motion_adapter_config,
                                  dtype=DTYPES[dtype])
    config = {**parts.pop("scheduler_config"), **(scheduler or {})}
    return AnimateDiff(motion_adapter=adapter, scheduler_config=config, decoder_tta=decoder_tta,
                       rgba_decode=rgba_decode, gradient_checkpointing=gradient_checkpointing, vae_batch=vae_batch,
                       **parts, **_transparency(transparent_encoder, transparent_decoder, allow_pickle, encoder_config,
                                     decoder_config))


def tiny(seed: int = 0, text_tokens: int = 16, transparent: bool = True, decoder_tta: bool = False,
         rgba_decode: bool = True, scheduler: dict[str, Any] | None = None, vae_batch: int = 16) -> AnimateDiff:
    """The tiny AnimateDiff + LayerDiffuse, built from configs on the spot (seeded)."""
    from layerkit_plugins.animatediff.tiny import tiny_components

    parts = tiny_components(seed, text_tokens, transparent)
    parts["scheduler_config"].update(scheduler or {})
    return AnimateDiff(decoder_tta=decoder_tta, rgba_decode=rgba_decode, vae_batch=vae_batch, **parts)
