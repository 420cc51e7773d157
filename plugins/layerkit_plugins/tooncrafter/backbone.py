"""``tooncrafter``: ToonCrafter's video UNet (Xing et al. 2024) as a layerkit backbone, the
backbone of LayerAnimate (Yang et al. 2025).

Parts: :class:`~.unet.ToonCrafterUNet` (denoiser, LayerAnimate's ``unet/`` key names), the SD 1.x
KL-f8 VAE (diffusers ``AutoencoderKL``, latents x 0.18215) for encoding and image-to-video decoding,
ToonCrafter's dual-reference decoder VAE (:class:`~.vae.DualRefAutoencoderKL`) for decoding an
interpolation, the OpenCLIP ViT-H-14 text encoder (penultimate layer, transformers ``CLIPTextModel``)
and image encoder (all 257 vision tokens, ``CLIPVisionModel``) with the :class:`~.resampler.Resampler`
image projector, and a DDIM schedule (v-prediction, zero terminal SNR, scaled-linear betas 0.00085
to 0.012, trailing spacing, eta 1).

How conditioning enters (NOTES 1.3, ``openaimodel3d.py``): the frames a task gives (``Packed.given``:
frame 0 for image-to-video, frames 0 and F-1 for interpolation) are *conditioning*, not re-imposed
frames (``given_mode = "condition"``): their latents are concatenated to the noisy latents as 4
extra input channels (image-to-video: frame 0's latent on every frame; interpolation: zeros but on
the first and last frame), the first given frame goes through the CLIP vision tower and the
Resampler (16 tokens per frame, decoupled cross-attention), the prompt through the text encoder,
and the fps value through the fps embedding. Every frame is denoised and enters the loss. The
unconditional half of classifier-free guidance is the empty prompt with the image tokens of an
all-zero image and the same concatenated latents (ToonCrafter's and LayerAnimate's pipelines).

Loading: ``path`` = a LayerAnimate-style directory (``unet/ vae/ vae_dualref/ image_projector/
scheduler/``; ``text_encoder``/``image_encoder``/``tokenizer`` as subfolders or given paths),
``checkpoint`` = ToonCrafter's ``model.ckpt`` (read once with ``torch.load(weights_only=True)``
when ``allow_pickle``; or its safetensors conversion: ``layerkit convert``), ``tiny=True`` = a seeded
tiny model built on the spot (tests, toy runs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Backbone, Packed, drop_blocks, dtype_of

SUBFOLDERS = ("unet", "vae", "vae_dualref", "image_projector", "scheduler")
#: LayerAnimate's released scheduler (NOTES 3.1): DDIM, v-prediction, zero terminal SNR, trailing spacing
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=0)
#: ToonCrafter's predicted-x0 rescale (``ddpm3d.py`` scale_arr): 1.0 -> 0.7 over the first 400 timesteps
SCALE_ARR_START, SCALE_ARR_END, SCALE_ARR_STEPS = 1.0, 0.7, 400

#: the tiny build: every code path of the UNet at 32 channels, 4 frames
TINY_UNET = dict(in_channels=8, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 2], dropout=0.0, num_head_channels=16, context_dim=32, temporal_length=4,
                 default_fps=24)
TINY_RESAMPLER = dict(dim=32, depth=1, dim_head=16, heads=2, num_queries=2, embedding_dim=64, output_dim=32,
                      ff_mult=2, video_length=4)


# ----------------------------------------------------------------------------------------
# components: tiny, a LayerAnimate-style folder, ToonCrafter's model.ckpt
# ----------------------------------------------------------------------------------------
def tiny_components(seed: int = 0, frames: int = 4) -> dict[str, Any]:
    """Seeded tiny UNet, Resampler, SD VAE, dual-reference VAE, CLIP text/image encoders and tokenizer."""
    from layerkit_plugins.tooncrafter.encoders import tiny_encoders
    from layerkit_plugins.tooncrafter.resampler import Resampler
    from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet
    from layerkit_plugins.tooncrafter.vae import TINY_DDCONFIG, DualRefAutoencoderKL, build_sd_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = ToonCrafterUNet(**{**TINY_UNET, "temporal_length": frames})
        projector = Resampler(**{**TINY_RESAMPLER, "video_length": frames})
        sd_vae = build_sd_vae(TINY_DDCONFIG)
        dual = DualRefAutoencoderKL(ddconfig=TINY_DDCONFIG)
        encoders = tiny_encoders(seed)
    return {"unet": unet.eval(), "image_projector": projector.eval(), "vae": sd_vae.eval(), "vae_dualref": dual.eval(),
            "text_encoder": encoders["text_encoder"], "image_encoder": encoders["image_encoder"],
            "tokenizer": encoders["tokenizer"], "scheduler_config": dict(SCHEDULER_CONFIG)}


def save_components(components: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write components as a LayerAnimate-style directory (one subfolder each, plus the encoders)."""
    from diffusers import DDIMScheduler

    directory = Path(directory)
    for name in ("unet", "image_projector", "vae", "vae_dualref", "text_encoder", "image_encoder", "tokenizer"):
        if components.get(name) is not None:
            components[name].save_pretrained(str(directory / name))
    DDIMScheduler(**components["scheduler_config"]).save_pretrained(str(directory / "scheduler"))
    return directory


def _subfolder(root: Path, name: str, given: str | None) -> Path | None:
    if given:
        path = Path(given)
        if not path.exists():
            raise LayerkitError(f"tooncrafter {name} '{path}' does not exist.")
        return path
    return root / name if (root / name).exists() else None


def load_folder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, text_encoder: str | None = None,
                image_encoder: str | None = None, tokenizer: str | None = None, allow_pickle: bool = False,
                dual_ref: bool = True) -> dict[str, Any]:
    """Components from a LayerAnimate-style directory (``unet/ vae/ vae_dualref/ image_projector/
    scheduler/``, e.g. ``Yuppie1204/LayerAnimate-Mix``); the OpenCLIP encoders, which the authors
    download at run time, come from ``text_encoder``/``image_encoder`` (an OpenCLIP weights file or a
    transformers folder) and ``tokenizer`` (a CLIP BPE tokenizer folder), or from subfolders of those names."""
    from diffusers import DDIMScheduler

    from layerkit_plugins.tooncrafter.encoders import load_image_encoder, load_text_encoder, load_tokenizer
    from layerkit_plugins.tooncrafter.resampler import Resampler
    from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet
    from layerkit_plugins.tooncrafter.vae import load_dual_ref_vae, load_sd_vae

    root = Path(str(path))
    if str(path) in ("???", "", "None") or not root.is_dir():
        raise LayerkitError(f"tooncrafter path '{path}' is not a directory; set backbone.path to a LayerAnimate-style "
                            f"folder ({', '.join(s + '/' for s in SUBFOLDERS)}), backbone.checkpoint to ToonCrafter's "
                            "model.ckpt, or use backbone=tooncrafter_tiny.")
    needed = ["unet", "vae", "image_projector", "scheduler"] + (["vae_dualref"] if dual_ref else [])
    missing = [s for s in needed if not (root / s).is_dir()]
    if missing:
        raise LayerkitError(f"tooncrafter directory '{root}' lacks the subfolder(s) {', '.join(s + '/' for s in missing)}"
                            f"; a LayerAnimate-style folder has {', '.join(s + '/' for s in SUBFOLDERS)}"
                            + (" (backbone.dual_ref=false loads without vae_dualref/)." if "vae_dualref" in missing else "."))
    sources = {name: _subfolder(root, name, given) for name, given in
               (("text_encoder", text_encoder), ("image_encoder", image_encoder), ("tokenizer", tokenizer))}
    absent = [n for n, p in sources.items() if p is None]
    if absent:
        raise LayerkitError(f"tooncrafter needs the OpenCLIP ViT-H-14 {', '.join(absent)} (LayerAnimate downloads them "
                            f"at run time): set backbone.{absent[0]}=PATH (an open_clip_pytorch_model.bin/.safetensors, "
                            f"or a transformers folder) or put {absent[0]}/ in '{root}'.")
    try:
        unet = ToonCrafterUNet.from_pretrained(str(root / "unet"), torch_dtype=dtype)
        projector = Resampler.from_pretrained(str(root / "image_projector"), torch_dtype=dtype)
        scheduler = dict(DDIMScheduler.load_config(str(root / "scheduler")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LayerkitError(f"tooncrafter directory '{root}' could not be loaded: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    return {
        "unet": unet, "image_projector": projector,
        "vae": load_sd_vae(root / "vae", dtype=dtype, allow_pickle=allow_pickle),
        "vae_dualref": load_dual_ref_vae(root / "vae_dualref", dtype=dtype, allow_pickle=allow_pickle) if dual_ref else None,
        "text_encoder": load_text_encoder(sources["text_encoder"], dtype=dtype, allow_pickle=allow_pickle),
        "image_encoder": load_image_encoder(sources["image_encoder"], dtype=dtype, allow_pickle=allow_pickle),
        "tokenizer": load_tokenizer(sources["tokenizer"]),
        "scheduler_config": {k: v for k, v in scheduler.items() if not k.startswith("_")},
    }


def load_checkpoint(checkpoint: str | os.PathLike, *, tokenizer: str | None, dtype: torch.dtype = torch.float32,
                    allow_pickle: bool = False, unet_config: dict[str, Any] | None = None,
                    projector_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Components from ToonCrafter's ``model.ckpt`` (or a safetensors copy of its state dict): the UNet,
    Resampler, dual-reference VAE (whose encoder and spatial decoder also make the SD VAE) and the
    OpenCLIP encoders all live in it; only the tokenizer (``tokenizer``: a CLIP BPE folder) does not."""
    from layerkit.io.weights import load_weights
    from layerkit_plugins.tooncrafter.checkpoint import (
        build_components,
        split_tooncrafter_checkpoint,
        unet_and_projector_states,
    )
    from layerkit_plugins.tooncrafter.convert import load_state_dict_strict
    from layerkit_plugins.tooncrafter.encoders import load_tokenizer
    from layerkit_plugins.tooncrafter.resampler import Resampler
    from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet

    path = Path(str(checkpoint))
    if not tokenizer:
        raise LayerkitError("ToonCrafter's model.ckpt holds no tokenizer: set backbone.tokenizer to a CLIP BPE "
                            "tokenizer folder (vocab.json + merges.txt, e.g. stable-diffusion-2-1/tokenizer).")
    state = load_weights(path, allow_pickle=allow_pickle)
    parts = split_tooncrafter_checkpoint(state, source=f"'{path}'")
    states = unet_and_projector_states(parts)
    with torch.device("meta"):
        unet = ToonCrafterUNet(**(unet_config or {}))
        projector = Resampler(**(projector_config or {}))
    load_state_dict_strict(unet, states["unet"], assign=True)
    load_state_dict_strict(projector, states["image_projector"], assign=True)
    built = build_components(parts, dtype=dtype, source=f"'{path}'")
    return {"unet": unet.to(dtype), "image_projector": projector.to(dtype), "vae": built["sd_vae"],
            "vae_dualref": built["vae"], "text_encoder": built["text_encoder"], "image_encoder": built["image_encoder"],
            "tokenizer": load_tokenizer(tokenizer), "scheduler_config": dict(SCHEDULER_CONFIG)}


# ----------------------------------------------------------------------------------------
# the backbone
# ----------------------------------------------------------------------------------------
class ToonCrafter(Backbone):
    """ToonCrafter image-to-video and interpolation; LayerAnimate's backbone."""

    latent_channels = 4
    given_mode = "condition"
    vae_pass = "clip"  # the SD VAE is per frame: one pass or per segment are the same
    memory_options = frozenset({"cpu_offload", "vae_tiling", "vae_slicing"})

    def __init__(self, path: str | None = None, checkpoint: str | None = None, tiny: bool = False, seed: int = 0,
                 tiny_frames: int = 4, dtype: str = "fp32", fps: float = 24.0, eta: float = 1.0,
                 dynamic_rescale: bool = False, decoder: str = "auto", text_encoder: str | None = None,
                 image_encoder: str | None = None, tokenizer: str | None = None, allow_pickle: bool = False,
                 scheduler: dict[str, Any] | None = None, vae_chunk: int = 16, gradient_checkpointing: bool = False,
                 dual_ref: bool = True, unet_config: dict[str, Any] | None = None,
                 image_projector_config: dict[str, Any] | None = None,
                 native_size: Sequence[int] | None = None) -> None:
        """``fps``: the fps condition (LayerAnimate passes 24, ToonCrafter's own scripts 10);
        ``dynamic_rescale``: ToonCrafter's predicted-x0 rescale (``scale_arr``, 1.0 -> 0.7), off in
        LayerAnimate; ``decoder``: "sd" (the SD VAE, per frame), "dual_ref" (the dual-reference decoder;
        needs a first and a last given frame) or "auto" (dual_ref for an interpolation when present);
        ``vae_chunk``: frames per VAE call (memory); ``unet_config``/``image_projector_config``: the
        architecture a ``model.ckpt`` holds when it is not the released 512 one (the file has no config);
        ``native_size``: [frames, height, width] sampled when the sampler names none (default 16 x 320 x
        512, the tiny model 4 x 32 x 32)."""
        super().__init__()
        sources = sum(bool(x) and str(x) not in ("???", "None") for x in (path, checkpoint)) + bool(tiny)
        if sources != 1:
            raise LayerkitError("backbone 'tooncrafter' takes exactly one of path=DIR (LayerAnimate-style folder), "
                                "checkpoint=model.ckpt or tiny=true.")
        if decoder not in ("auto", "sd", "dual_ref"):
            raise LayerkitError(f"backbone.decoder is '{decoder}'; expected auto, sd or dual_ref.")
        torch_dtype = dtype_of(dtype, key="backbone.dtype")
        if tiny:
            parts = tiny_components(seed, tiny_frames)
        elif checkpoint and str(checkpoint) not in ("???", "None"):
            parts = load_checkpoint(checkpoint, tokenizer=tokenizer, dtype=torch_dtype, allow_pickle=allow_pickle,
                                    unet_config=unet_config, projector_config=image_projector_config)
        else:
            parts = load_folder(path, dtype=torch_dtype, text_encoder=text_encoder, image_encoder=image_encoder,
                                tokenizer=tokenizer, allow_pickle=allow_pickle, dual_ref=dual_ref)
        self.setup(parts, fps=fps, eta=eta, dynamic_rescale=dynamic_rescale, decoder=decoder, vae_chunk=vae_chunk,
                   scheduler=scheduler, native_size=native_size or ((tiny_frames, 32, 32) if tiny else None))
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.requires_grad_(False)

    def setup(self, parts: dict[str, Any], *, fps: float = 24.0, eta: float = 1.0, dynamic_rescale: bool = False,
              decoder: str = "auto", vae_chunk: int = 16, scheduler: dict[str, Any] | None = None,
              native_size: Sequence[int] | None = None) -> None:
        """Take ``parts`` (unet, image_projector, vae, vae_dualref, text_encoder, image_encoder, tokenizer,
        scheduler_config) as this backbone's components."""
        self.denoiser = parts["unet"]
        self.image_projector = parts["image_projector"]
        self.vae = parts["vae"]
        self.vae_dualref = parts.get("vae_dualref")
        self.text_encoder = parts["text_encoder"]
        self.image_encoder = parts["image_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.scheduler_config = {**parts["scheduler_config"], **(scheduler or {})}
        self.fps, self.eta, self.dynamic_rescale = float(fps), float(eta), bool(dynamic_rescale)
        self.decoder, self.vae_chunk = decoder, max(int(vae_chunk), 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.spatial_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.num_frames = int(self.denoiser.config.temporal_length)
        self.__dict__["_references"] = None  # the dual-reference decoder's maps of the last conditioning
        # the authors' 320 x 512 (NOTES 1.1: latent 40 x 64) unless said otherwise (the tiny model: 32 x 32)
        self.native_size = tuple(int(v) for v in native_size) if native_size else (self.num_frames, 320, 512)
        if self.native_size[0] != self.num_frames:
            raise LayerkitError(f"backbone.native_size has {self.native_size[0]} frames; this UNet animates "
                                f"{self.num_frames}.")
        self.requires_grad_(False)

    @classmethod
    def from_components(cls, parts: dict[str, Any], **options: Any) -> ToonCrafter:
        """A backbone over components built elsewhere (benchmarks, conversions)."""
        backbone = cls.__new__(cls)
        Backbone.__init__(backbone)
        backbone.setup(parts, **options)
        return backbone

    # -- schedule --------------------------------------------------------------------------
    def make_scheduler(self, kind: str = "train", name: str | None = None) -> Any:
        from diffusers import DDIMScheduler, DDPMScheduler

        if kind == "train":
            return DDPMScheduler.from_config(self.scheduler_config)
        if name not in (None, "ddim"):
            raise LayerkitError(f"tooncrafter has no sampler '{name}'; it samples with ddim (DDIMScheduler, eta "
                                f"{self.eta:g}, trailing spacing).")
        return DDIMScheduler.from_config(self.scheduler_config)

    def scheduler_step(self, scheduler: Any, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
                       state: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM with eta (1.0: the authors'), as ``DDIMScheduler.step`` for v-prediction, with two
        differences: the direction term's ``1 - a_prev - sigma^2`` is clamped at 0 (at the first step of a
        zero-terminal-SNR schedule with eta 1 it is 0 and rounding may push it below, which gives NaN in
        diffusers' step), and with ``dynamic_rescale`` ToonCrafter's own sampler scales the predicted x0
        by ``scale_arr[t_prev] / scale_arr[t]`` (``lvdm/models/samplers/ddim.py``)."""
        return self._ddim_step(scheduler, model_output, t, sample, generator)

    def _ddim_step(self, scheduler: Any, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        t_int, prev = int(t), int(t) - step
        ac = scheduler.alphas_cumprod.to(x.device, torch.float32)
        a_t = ac[t_int]
        a_prev = ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(x.device, torch.float32)
        xf, vf = x.float(), v.float()
        x0 = a_t.sqrt() * xf - (1 - a_t).sqrt() * vf
        eps = (1 - a_t).sqrt() * xf + a_t.sqrt() * vf
        if self.dynamic_rescale:
            scale = scale_arr(scheduler.config.num_train_timesteps).to(x.device)
            x0 = x0 * scale[max(prev, 0)] / scale[t_int]
        sigma = self.eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        direction = (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        out = a_prev.sqrt() * x0 + direction
        if self.eta > 0:
            noise = randn_tensor(v.shape, generator=generator, device=v.device, dtype=v.dtype)
            out = out + sigma * noise.float()
        return out.to(x.dtype)

    # -- latent space ----------------------------------------------------------------------
    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.spatial_factor
        if height % f or width % f:
            raise LayerkitError(f"tooncrafter needs height and width divisible by {f}; got {height}x{width}.")
        return height // f, width // f

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [-1, 1] -> [B, 4, F, h, w] x 0.18215 (a posterior draw in training, its mean
        otherwise), ``vae_chunk`` frames per call."""
        b, f, c = video.shape[:3]
        if c != 3:
            raise LayerkitError(f"tooncrafter encodes RGB frames; got {c} channels.")
        dtype = self.vae.dtype
        frames = video.flatten(0, 1).to(self.execution_device, dtype)
        out = []
        for chunk in frames.split(self.vae_chunk):
            dist = self.vae.encode(chunk).latent_dist
            out.append(dist.sample() if self.training else dist.mean)
        latents = torch.cat(out) * self.scaling_factor
        return latents.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, F, h, w] -> [B, F, 3, H, W] in [-1, 1]: the dual-reference decoder when the last
        conditioning was an interpolation and ``decoder`` allows it, else the SD VAE frame by frame."""
        z = latents / self.scaling_factor
        refs = self.__dict__.get("_references")
        use_dual = self.decoder == "dual_ref" or (self.decoder == "auto" and refs is not None)
        if use_dual:
            if self.vae_dualref is None:
                raise LayerkitError("backbone.decoder=dual_ref needs the dual-reference VAE (vae_dualref/).")
            if refs is None:
                raise LayerkitError("the dual-reference decoder needs a first and a last given frame (interpolation).")
            dec = self.vae_dualref.decode(z.to(self.execution_device), refs, videos_per_call=1).sample  # [B, 3, F, H, W]
            return dec.permute(0, 2, 1, 3, 4)
        b, _, f = z.shape[:3]
        rows = z.permute(0, 2, 1, 3, 4).flatten(0, 1).to(self.execution_device, self.vae.dtype)
        out = [self.vae.decode(chunk).sample for chunk in rows.split(self.vae_chunk)]
        return torch.cat(out).unflatten(0, (b, f))

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        from layerkit_plugins.tooncrafter.encoders import encode_text

        return {"prompt_embeds": encode_text(self.text_encoder, self.tokenizer, list(prompts))}

    def encode_image_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> per-frame image tokens [B, F*L, D] (CLIP vision -> Resampler)."""
        from layerkit_plugins.tooncrafter.encoders import encode_images

        tokens = encode_images(self.image_encoder, frames.to(self.execution_device))
        return self.image_projector(tokens.to(self.image_projector.dtype))

    @staticmethod
    def _given_frames(packed: Packed) -> list[list[int]]:
        """The given frames of each sample (a batch may mix image-to-video and interpolation)."""
        rows = [torch.nonzero(row).flatten().tolist() for row in packed.given]
        if any(not frames for frames in rows):
            raise LayerkitError("tooncrafter animates given frames: a sample gives none (image-to-video gives frame "
                                "0, interpolation frames 0 and F-1).")
        return rows

    def image_latents(self, packed: Packed, latents: torch.Tensor) -> torch.Tensor:
        """The concatenated image latent [B, 4, F, h, w]: image-to-video (only frame 0 given) repeats
        frame 0's latent on every frame; otherwise the given frames' latents at their places, zeros
        elsewhere (interpolation: frames 0 and F-1) (``scripts/evaluation/inference.py``); per sample."""
        out = torch.zeros_like(latents)
        for i, frames in enumerate(self._given_frames(packed)):
            if frames == [0]:
                out[i] = latents[i, :, :1].expand_as(latents[i])
            else:
                out[i, :, frames] = latents[i, :, frames]
        return out

    def _first_frame(self, packed: Packed) -> torch.Tensor:
        """[B, 3, H, W]: each sample's first given frame (the image the CLIP vision tower sees)."""
        from layerkit.pipeline import packed_video

        video = packed_video(packed)
        if video is None:
            raise LayerkitError("tooncrafter needs the first given frame's pixels for its image tokens.")
        firsts = [frames[0] for frames in self._given_frames(packed)]
        return video[torch.arange(video.shape[0]), torch.tensor(firsts)]

    def _fps(self, packed: Packed, rows: int, device: torch.device) -> torch.Tensor:
        fps = packed.conditions.get("fps")
        if fps is None:
            return torch.full((rows,), self.fps, device=device)
        return torch.as_tensor(fps, dtype=torch.float32, device=device).reshape(-1).expand(rows).clone()

    def _set_references(self, packed: Packed) -> None:
        """Keep the dual-reference decoder's maps of the first and last given frames (interpolation)."""
        from layerkit.pipeline import packed_video

        last = packed.num_frames - 1
        interpolation = all(frames[0] == 0 and frames[-1] == last and len(frames) >= 2
                            for frames in self._given_frames(packed))
        self.__dict__["_references"] = None
        if self.vae_dualref is None or self.decoder == "sd" or not interpolation:
            return
        video = packed_video(packed, self.execution_device)
        keys = video[:, [0, packed.num_frames - 1]].permute(0, 2, 1, 3, 4).to(self.vae_dualref.dtype)  # [B, 3, 2, H, W]
        with torch.no_grad():
            _, refs = self.vae_dualref.encode_with_references(keys, chunk_size=self.vae_chunk)
        self.__dict__["_references"] = refs

    def encode_conditions(self, packed: Packed, latents: torch.Tensor | None = None,
                          drop: torch.Tensor | None = None) -> dict[str, Any]:
        if latents is None:
            raise LayerkitError("tooncrafter's conditioning needs the latents of the given frames.")
        b = packed.batch_size
        frame = self._first_frame(packed)
        prompts = [row[0] for row in packed.prompts]
        drop_rows = drop_blocks(drop, 1)[:, 0] if drop is not None else torch.zeros(b, dtype=torch.bool)
        prompts = ["" if d else p for p, d in zip(prompts, drop_rows.tolist(), strict=True)]
        keep = (~drop_rows).to(frame.device, frame.dtype).view(-1, 1, 1, 1)
        image = self.encode_image_tokens(frame * keep)  # a dropped sample: the zero image's tokens
        if self.training is False:
            self._set_references(packed)
        return {"prompt_embeds": self.encode_prompts(prompts)["prompt_embeds"], "image_embeds": image,
                "image_latents": self.image_latents(packed, latents), "fps": self._fps(packed, b, latents.device)}

    def negative_conditions(self, packed: Packed, cond: dict[str, Any], negative_prompt: str = "",
                            latents: torch.Tensor | None = None) -> dict[str, Any]:
        """The empty (or negative) prompt, the image tokens of an all-zero image, the same image latents and fps."""
        frame = self._first_frame(packed)
        text = self.encode_prompts([negative_prompt] * packed.batch_size)["prompt_embeds"]
        return {**cond, "prompt_embeds": text, "image_embeds": self.encode_image_tokens(torch.zeros_like(frame))}

    # -- the denoiser ----------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """[R, 4, F, h, w] -> v [R, 4, F, h, w]; the image latents are concatenated as 4 more channels."""
        f = noisy.shape[2]
        if f != self.num_frames:
            raise LayerkitError(f"this ToonCrafter UNet animates {self.num_frames} frames (its Resampler has "
                                f"{self.num_frames} x {self.image_projector.config.num_queries} queries); got {f}.")
        dtype = self.denoiser.dtype
        x = torch.cat([noisy, cond["image_latents"].to(noisy.device, noisy.dtype)], dim=1)
        out = self.denoiser(x.to(dtype), timesteps, cond["prompt_embeds"].to(noisy.device, dtype),
                            context_img=cond["image_embeds"].to(noisy.device, dtype),
                            fps=cond["fps"].to(noisy.device), return_dict=False)[0]
        return out.to(noisy.dtype)

    # -- memory ----------------------------------------------------------------------------
    def components_for_offload(self) -> list[nn.Module]:
        order = [self.text_encoder, self.image_encoder, self.image_projector, self.vae, self.denoiser,
                 self.vae_dualref]
        return [m for m in order if m is not None]

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def enable_vae_slicing(self) -> None:
        self.vae_chunk = 1


def scale_arr(num_train_timesteps: int = 1000) -> torch.Tensor:
    """ToonCrafter's ``scale_arr``: linspace(1.0, 0.7, 400) then 0.7 for the remaining timesteps."""
    head = torch.linspace(SCALE_ARR_START, SCALE_ARR_END, SCALE_ARR_STEPS)
    return torch.cat([head, torch.full((num_train_timesteps - SCALE_ARR_STEPS,), SCALE_ARR_END)])


def tiny(seed: int = 0, frames: int = 4, **kwargs: Any) -> ToonCrafter:
    return ToonCrafter(tiny=True, seed=seed, tiny_frames=frames, **kwargs)
