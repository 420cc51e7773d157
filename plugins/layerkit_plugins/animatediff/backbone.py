"""``animatediff``: SD 1.5 + AnimateDiff motion module (diffusers ``UNetMotionModel``) with
LayerDiffuse latent transparency, the backbone of Layer-Animate (seed 003, sec. 3).

Shapes: videos [B, F, C, H, W] in [-1, 1] with C = 3 (RGB) or 4 (straight RGB + alpha, both
in [-1, 1]); latents [B, 4, F, H/f, W/f] (f = 8 for SD 1.5's VAE) scaled by its 0.18215; no temporal compression.

* RGBA frames are encoded the LayerDiffuse way: the RGB composited on mid-grey goes through
  the VAE, and the offset encoder's output on ``[alpha, padded RGB]`` shifts the posterior
  mean by ``std * offset``. RGB frames take the posterior mean.
* ``decode_latents`` returns RGB, or with a transparent decoder and ``rgba_decode`` RGBA
  [B, F, 4, H, W] in [-1, 1]: VAE first, then the transparent decoder on (RGB, latent).
* ``predict`` calls ``UNetMotionModel(sample [B, C, F, h, w], t, prompt embeds repeated per
  frame)`` exactly as diffusers' ``AnimateDiffPipeline`` does; ``prepare_noise`` draws the
  pipeline's [B, C, F, h, w] noise so seeds match it.
* Stage 1 (Layer-Animate's transparent image): :meth:`AnimateDiff.generate_images` runs the
  SD 1.5 ``UNet2DConditionModel`` held inside the motion UNet (:func:`share_image_unet`: the
  same modules, no second copy of the weights) with LayerDiffuse's transparent attention
  (``transparent_attn``, see ``transparent_attn.py``) through layerkit's sampling loop, then
  decodes RGBA with the transparent decoder. ``transparent_attn_video`` keeps that attention
  on in the video UNet too (the "layer diffusion model + motion module" of the paper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Backbone, dtype_of

#: UNetMotionModel block type -> the UNet2DConditionModel block it wraps
_IMAGE_BLOCKS = {"CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D",
                 "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D", "UpBlockMotion": "UpBlock2D",
                 "UNetMidBlockCrossAttnMotion": "UNetMidBlock2DCrossAttn"}


def image_unet_config(unet: nn.Module) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config for the spatial part of a ``UNetMotionModel``."""
    import inspect

    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    for key in ("down_block_types", "up_block_types"):
        config[key] = tuple(_IMAGE_BLOCKS.get(t, t) for t in config[key])
    if config.get("mid_block_type") in _IMAGE_BLOCKS:
        config["mid_block_type"] = _IMAGE_BLOCKS[config["mid_block_type"]]
    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters)
    return {k: v for k, v in config.items() if k in accepted}


def share_image_unet(motion_unet: nn.Module, config: Mapping[str, Any]) -> nn.Module:
    """A ``UNet2DConditionModel`` whose every module *is* the motion UNet's spatial module.

    Built on the meta device, then each child (conv_in, time embedding, each block's
    resnets/attentions/samplers, mid block, output head) is replaced by the motion UNet's
    own: no weight is copied, and whatever moves, casts or patches the video UNet (devices,
    dtypes, attention processors) applies to this view as well.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        view = UNet2DConditionModel.from_config(dict(config))

    def share(target: nn.Module, source: nn.Module, where: str) -> None:
        for name, _ in list(target.named_children()):
            if name in ("down_blocks", "up_blocks"):
                for i, (t, s) in enumerate(zip(getattr(target, name), getattr(source, name), strict=True)):
                    share(t, s, f"{where}{name}.{i}.")
            elif name == "mid_block":
                share(target.mid_block, source.mid_block, f"{where}mid_block.")
            else:
                child = getattr(source, name, None)
                if child is None:
                    raise LayerkitError(f"the motion UNet has no '{where}{name}' to share with the image UNet.")
                setattr(target, name, child)

    share(view, motion_unet, "")
    left = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if left:
        raise LayerkitError(f"the image UNet could not share {len(left)} tensors with the motion UNet (first {left[0]}).")
    return view.eval()


class AnimateDiff(Backbone):
    latent_channels = 4
    memory_options = frozenset({"cpu_offload", "vae_tiling", "vae_slicing"})
    lora_prefix = "unet"

    def __init__(self, unet: nn.Module, motion_adapter: nn.Module | None, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, scheduler_config: dict[str, Any], offset_encoder: nn.Module | None = None,
                 transparent_decoder: nn.Module | None = None, decoder_tta: bool = False, rgba_decode: bool = True,
                 gradient_checkpointing: bool = False, vae_batch: int = 16,
                 transparent_attn: str | Path | Mapping[str, torch.Tensor] | nn.Module | None = None,
                 transparent_attn_video: bool = True, allow_pickle: bool = False) -> None:
        super().__init__()
        from diffusers import UNetMotionModel

        from layerkit_plugins.animatediff.transparent_attn import (
            TransparentAttention,
            load_transparent_attention,
        )

        if not isinstance(unet, UNetMotionModel):
            if motion_adapter is None:
                raise LayerkitError("animatediff needs a motion adapter (motion_adapter=<folder or motion-module file>).")
            image_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
            unet = UNetMotionModel.from_unet2d(unet, motion_adapter)
        else:
            image_config = image_unet_config(unet)
        self.denoiser = unet
        self.image_config = image_config
        if transparent_attn is None or isinstance(transparent_attn, TransparentAttention):
            attn = transparent_attn
        else:  # a file path or a state dict with the published key names
            attn = load_transparent_attention(unet, transparent_attn, allow_pickle=allow_pickle)
        if attn is not None:
            attn.install(unet)
            attn.enabled = bool(transparent_attn_video)
        self.transparent_attn = attn
        self.transparent_attn_video = bool(transparent_attn_video)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.offset_encoder = offset_encoder
        self.transparent_decoder = transparent_decoder
        self.scheduler_config = dict(scheduler_config)
        self.decoder_tta, self.rgba_decode = bool(decoder_tta), bool(rgba_decode)
        self.vae_batch = int(vae_batch)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        f = self.vae_scale_factor
        if offset_encoder is not None and getattr(offset_encoder, "downsampling", f) != f:
            raise LayerkitError(f"the transparent offset encoder downsamples {offset_encoder.downsampling}x but the VAE "
                                f"{f}x; give encoder_config.channels {int(math.log2(f)) + 1} channel counts.")
        if transparent_decoder is not None and f < 2:
            raise LayerkitError("the VAE does not downsample (one level), and the transparent decoder takes the latent "
                                "at 1/2 resolution or less; give the VAE at least two levels.")
        if transparent_decoder is not None and 2 ** getattr(transparent_decoder, "latent_block", math.log2(f)) != f:
            raise LayerkitError(f"the transparent decoder takes its latent at 1/{2 ** transparent_decoder.latent_block} "
                                f"resolution but the VAE downsamples {f}x; set decoder_config.latent_block "
                                f"{int(math.log2(f))}.")
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
        dtype = next(self.vae.parameters()).dtype
        frames = video.flatten(0, 1).to(self.execution_device, dtype)  # not the VAE's: under offload it waits on the CPU
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
        from layerkit_plugins.animatediff.layerdiffuse import composite_on_grey, pad_rgb

        alpha = ((x[:, 3:] + 1) / 2).clamp(0, 1)
        rgb = x[:, :3].clamp(-1, 1)
        grey = composite_on_grey((rgb + 1) / 2, alpha) * 2 - 1  # over LayerDiffuse's grey 127/255
        posterior = self.vae.encode(grey).latent_dist
        padded = pad_rgb((rgb + 1) / 2, alpha)
        offset = self.offset_encoder(torch.cat([alpha, padded], dim=1).to(x.dtype))
        return posterior.mean + posterior.std * offset

    def decode_latents(self, latents: torch.Tensor, rgba: bool | None = None) -> torch.Tensor:
        """[B, 4, F, h, w] -> [B, F, 3, H, W] (or RGBA [B, F, 4, H, W]) in [-1, 1]; ``rgba``
        overrides the backbone's ``rgba_decode``."""
        rgba = self.rgba_decode if rgba is None else bool(rgba)
        b, _, f = latents.shape[:3]
        z = (latents / self.scaling_factor).permute(0, 2, 1, 3, 4).flatten(0, 1)
        dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in self._frames(z.to(self.execution_device, dtype)):
            pixel = self.vae.decode(chunk).sample
            if rgba and self.transparent_decoder is not None:
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

    # -- stage 1: the transparent image ----------------------------------------------------
    def image_unet(self) -> nn.Module:
        """The SD 1.5 ``UNet2DConditionModel`` inside the motion UNet (shared modules, built once)."""
        view = self.__dict__.get("_image_unet")
        if view is None:
            view = share_image_unet(self.denoiser, self.image_config)
            self.__dict__["_image_unet"] = view  # not a submodule: its weights are the denoiser's
        return view

    def image_stage(self) -> ImageStage:
        stage = self.__dict__.get("_image_stage")
        if stage is None:
            stage = ImageStage(self)
            self.__dict__["_image_stage"] = stage
        return stage

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], *, height: int, width: int, steps: int = 25,
                        guidance_scale: float = 7.5, guidance_rescale: float = 0.0, negative_prompt: str = "",
                        scheduler: str | None = None, generator: torch.Generator | None = None,
                        progress: bool = False, require_transparent_attn: bool = True,
                        return_latents: bool = False) -> torch.Tensor:
        """Layer-Animate stage 1: prompts -> transparent images [B, 4, H, W], straight RGBA in [0, 1].

        The SD 1.5 image UNet with LayerDiffuse's transparent attention samples transparent
        latents through layerkit's loop (same schedulers and guidance as stage 2); the VAE and
        then the transparent decoder turn them into RGBA. ``return_latents`` returns the
        scaled latents [B, 4, h, w] instead (what diffusers' ``output_type="latent"`` gives).
        """
        from layerkit.pipeline import Parts
        from layerkit.protocols import Packed, Segment, Task
        from layerkit.sampling.loop import SamplerOptions, denoise

        if self.transparent_attn is None and require_transparent_attn:
            raise LayerkitError(
                "stage 1 (prompt -> transparent image) needs LayerDiffuse's transparent attention: set "
                "backbone.transparent_attn to layer_sd15_transparent_attn.safetensors."
            )
        if self.transparent_decoder is None and not return_latents:
            raise LayerkitError(
                "stage 1 decodes RGBA with the LayerDiffuse transparent decoder: set backbone.transparent_decoder "
                "to layer_sd15_vae_transparent_decoder.safetensors."
            )
        packed = Packed([Segment("image", 1)], torch.zeros(len(prompts), 1, dtype=torch.bool),
                        [[p] for p in prompts], int(height), int(width))  # one generated frame
        options = SamplerOptions(steps=int(steps), guidance_scale=float(guidance_scale),
                                 guidance_rescale=float(guidance_rescale), scheduler=scheduler,
                                 negative_prompt=negative_prompt, progress=progress)
        switched = self.transparent_attn.switched(True) if self.transparent_attn is not None else nullcontext()
        with switched:
            latents = denoise(Parts(self.image_stage(), Task()), packed, options, generator=generator).latents
        if return_latents:
            return latents[:, :, 0]
        rgba = self.decode_latents(latents, rgba=True)[:, 0]
        return ((rgba.float() + 1) / 2).clamp(0, 1)

    # -- memory ----------------------------------------------------------------------------
    def components_for_offload(self) -> list[nn.Module]:
        order = [self.vae, self.offset_encoder, self.text_encoder, self.denoiser, self.transparent_decoder]
        return [m for m in order if m is not None]

    def enable_memory_options(self, options: dict[str, bool], device: torch.device) -> None:
        super().enable_memory_options(options, device)
        if options.get("cpu_offload") and self.transparent_attn is not None:
            # the units run inside the denoiser's attentions: keep them where the denoiser runs
            self.transparent_attn.to(device)

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()


class ImageStage(Backbone):
    """The SD 1.5 image model of an :class:`AnimateDiff` backbone as a layerkit backbone, so
    stage 1 runs through the same sampling loop: one latent frame, ``UNet2DConditionModel``.
    Everything but the view is the video backbone's (encoders, VAE, schedule)."""

    latent_channels = 4

    def __init__(self, video: AnimateDiff) -> None:
        super().__init__()
        self.__dict__["video"] = video  # not a submodule
        self.denoiser = video.image_unet()

    def make_scheduler(self, kind: str = "train", name: str | None = None) -> Any:
        return self.video.make_scheduler(kind, name)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return self.video.latent_size(height, width)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        return self.video.encode_video(video)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video.decode_latents(latents)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.video.encode_prompts(prompts)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        if noisy.shape[2] != 1:
            raise LayerkitError(f"the image stage samples one frame; got {noisy.shape[2]}.")
        dtype = self.denoiser.dtype
        text = cond["prompt_embeds"].to(noisy.device, dtype)
        out = self.denoiser(noisy[:, :, 0].to(dtype), timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return out.unsqueeze(2).to(noisy.dtype)


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
                    vae_batch: int = 16, transparent_attn: str | None = None,
                    transparent_attn_video: bool = True) -> AnimateDiff:
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
    torch_dtype = dtype_of(dtype, key="backbone.dtype")
    parts = load_sd15_folder(path, torch_dtype)
    adapter = load_motion_adapter(motion_adapter, allow_pickle=allow_pickle, config=motion_adapter_config,
                                  dtype=torch_dtype)
    config = {**parts.pop("scheduler_config"), **(scheduler or {})}
    return AnimateDiff(motion_adapter=adapter, scheduler_config=config, decoder_tta=decoder_tta,
                       rgba_decode=rgba_decode, gradient_checkpointing=gradient_checkpointing, vae_batch=vae_batch,
                       transparent_attn=transparent_attn or None, transparent_attn_video=transparent_attn_video,
                       allow_pickle=allow_pickle, **parts, **_transparency(transparent_encoder, transparent_decoder, allow_pickle, encoder_config,
                                     decoder_config))


def tiny(seed: int = 0, text_tokens: int = 16, transparent: bool = True, decoder_tta: bool = False,
         rgba_decode: bool = True, scheduler: dict[str, Any] | None = None, vae_batch: int = 16,
         transparent_attn: str | None = None, transparent_attn_video: bool = True) -> AnimateDiff:
    """The tiny AnimateDiff + LayerDiffuse, built from configs on the spot (seeded).
    ``transparent_attn``: a file with the published key names for the tiny UNet's attentions
    (``tiny.save_tiny`` writes one), or ``"random"`` for seeded random units."""
    from layerkit_plugins.animatediff.tiny import random_transparent_attn_state, tiny_components

    parts = tiny_components(seed, text_tokens, transparent)
    parts["scheduler_config"].update(scheduler or {})
    if transparent_attn == "random":
        transparent_attn = random_transparent_attn_state(parts["unet"], seed=seed)
    return AnimateDiff(decoder_tta=decoder_tta, rgba_decode=rgba_decode, vae_batch=vae_batch,
                       transparent_attn=transparent_attn or None, transparent_attn_video=transparent_attn_video,
                       **parts)
