"""``cogvideox``: CogVideoX (diffusers) as a layerkit backbone.

Parts: ``CogVideoXTransformer3DModel`` (denoiser), ``AutoencoderKLCogVideoX`` (3D causal VAE,
8x spatial and 4x temporal compression, latents x ``scaling_factor`` 1.15258426), T5 encoder and
tokenizer, ``CogVideoXDDIMScheduler`` (training, ``ddim``) and ``CogVideoXDPMScheduler``
(``dpm``); v-prediction with zero terminal SNR.

Loads a local diffusers-format directory (``transformer/ vae/ text_encoder/ tokenizer/
scheduler/``) or, with ``tiny=True``, builds a seeded tiny model on the spot (tests, CPU).

Layout: layerkit latents are [B, C, f, h, w]; diffusers' CogVideoX works in [B, F, C, H, W].
Noise and the DPM scheduler's own noise are drawn in diffusers' layout, so a seed gives the
same sample as ``CogVideoXPipeline``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Backbone, Packed, drop_blocks, dtype_of

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
UNCOND = ("zeros", "empty_prompt")
#: CogVideoX-2B's scheduler_config.json (v-prediction, zero terminal SNR, SNR shift 3)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False, set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0)
#: words of the shapes world (and LayerFlow's "index, " prefixes) for the tiny tokenizer
TINY_WORDS = ("a an and over moving standing still drifting left right up down , . 0 1 2 3 "
              "circle square triangle cross red green blue yellow magenta cyan white black "
              "stripes gradient checker dots video background foreground scene")


# ----------------------------------------------------------------------------------------
# tiny components (tests, laptops): built from configs, no download
# ----------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A T5 (Unigram) tokenizer over the shapes-world words plus single characters, built offline."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in TINY_WORDS.split()]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_components(seed: int = 0, layers: int = 12, rotary: bool = False, text_tokens: int = 16,
                    sample_size: int = 32) -> dict[str, Any]:
    """Seeded tiny transformer (hidden 32), VAE (4 latent channels), T5 encoder, tokenizer, scheduler."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=32, num_layers=layers, sample_width=sample_size // 8, sample_height=sample_size // 8,
            sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=text_tokens,
            use_rotary_positional_embeddings=rotary,
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
            sample_height=sample_size, sample_width=sample_size,
        )
        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, dropout_rate=0.0, is_encoder_decoder=False,
                          use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        text_encoder = T5EncoderModel(config)
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "tokenizer": tokenizer, "scheduler": scheduler}


def save_components(components: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write components as a diffusers-format directory (one subfolder each)."""
    directory = Path(directory)
    for name in SUBFOLDERS:
        components[name].save_pretrained(str(directory / name))
    return directory


#: layerkit's key in a CogVideoX VAE's ``config.json``: the decoder's own ``block_out_channels``, for
#: a decoder wider than its encoder (an asymmetric autoencoder: the latents, and so every denoiser
#: trained on them, stay the encoder's; diffusers builds both halves from ``block_out_channels``)
DECODER_WIDTHS = "decoder_block_out_channels"


def with_decoder_widths(vae: Any, widths: Sequence[int]) -> Any:
    """``vae`` (an ``AutoencoderKLCogVideoX``) with a fresh, untrained decoder of ``widths`` (one per
    up block, in ``block_out_channels``' order), recorded in its config under ``DECODER_WIDTHS``."""
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXDecoder3D

    c = vae.config
    widths = [int(w) for w in widths]
    if len(widths) != len(c.block_out_channels) or any(w < 1 or w % int(c.norm_num_groups) for w in widths):
        raise LayerkitError(
            f"decoder widths {widths} do not fit this VAE: give {len(c.block_out_channels)} widths (one per up "
            f"block, as block_out_channels {list(c.block_out_channels)}), each a positive multiple of "
            f"norm_num_groups {c.norm_num_groups}."
        )
    vae.decoder = CogVideoXDecoder3D(
        in_channels=c.latent_channels, out_channels=c.out_channels, up_block_types=c.up_block_types,
        block_out_channels=tuple(widths), layers_per_block=c.layers_per_block, act_fn=c.act_fn,
        norm_eps=c.norm_eps, norm_num_groups=c.norm_num_groups, temporal_compression_ratio=c.temporal_compression_ratio,
    ).to(dtype=next(vae.encoder.parameters()).dtype)
    vae.register_to_config(**{DECODER_WIDTHS: widths})
    return vae


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    """An ``AutoencoderKLCogVideoX`` from a local diffusers-format ``vae/`` folder; one whose config
    names ``DECODER_WIDTHS`` (written by :func:`with_decoder_widths`) gets a decoder of those widths."""
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import load_file

    config = dict(AutoencoderKLCogVideoX.load_config(str(path)))
    widths = config.pop(DECODER_WIDTHS, None)
    if widths is None:
        return AutoencoderKLCogVideoX.from_pretrained(str(path), torch_dtype=dtype)
    file = Path(str(path)) / "diffusion_pytorch_model.safetensors"
    if not file.is_file():
        raise LayerkitError(f"VAE folder '{path}' names decoder widths {widths} but holds no "
                            f"diffusion_pytorch_model.safetensors (a VAE with its own decoder widths loads from safetensors).")
    with torch.random.fork_rng(devices=[]):  # as from_pretrained: building the modules draws no global numbers
        vae = with_decoder_widths(AutoencoderKLCogVideoX.from_config(config), widths)
    try:
        missing, unexpected = vae.load_state_dict(load_file(str(file)), strict=False)
    except RuntimeError as exc:  # a weight of another shape than the config's
        first = str(exc).strip().splitlines()[-1].strip()
        raise LayerkitError(f"VAE folder '{path}' does not match its config (decoder widths {widths}): {first}") from None
    if missing or unexpected:
        raise LayerkitError(f"VAE folder '{path}' does not match its config (decoder widths {widths}): "
                            f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                            f"(e.g. {unexpected[:2]}).")
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def _conv_layout(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] for the VAE's 3-D convolutions: channels-last on the CPU, where oneDNN runs
    the toy VAE's encoder and decoder about 1.2x faster that way (``benchmarks/bench_toy_vae.py``,
    docs/benchmarks.md; outputs within 1e-5); as it is elsewhere."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" else x


def load_components(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Components from a local diffusers-format CogVideoX directory (e.g. THUDM/CogVideoX-2b)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    root = Path(str(path))
    if str(path) in ("???", "", "None") or not root.is_dir():
        raise LayerkitError(
            f"CogVideoX path '{path}' is not a directory; set backbone.path to a local diffusers-format "
            f"CogVideoX directory (with {', '.join(s + '/' for s in SUBFOLDERS)}) or use backbone=cogvideox_tiny."
        )
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise LayerkitError(
            f"CogVideoX directory '{root}' lacks the subfolder(s) {', '.join(s + '/' for s in missing)}; "
            f"a diffusers-format checkpoint has {', '.join(s + '/' for s in SUBFOLDERS)}."
        )
    try:
        return {
            "transformer": CogVideoXTransformer3DModel.from_pretrained(str(root / "transformer"), torch_dtype=dtype),
            "vae": load_vae(root / "vae", dtype),
            "text_encoder": T5EncoderModel.from_pretrained(str(root / "text_encoder"), dtype=dtype),
            "tokenizer": AutoTokenizer.from_pretrained(str(root / "tokenizer")),
            "scheduler": CogVideoXDDIMScheduler.from_pretrained(str(root / "scheduler")),
        }
    except (OSError, ValueError, KeyError) as exc:
        raise LayerkitError(f"CogVideoX directory '{root}' could not be loaded: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------------------
# the backbone
# ----------------------------------------------------------------------------------------
class CogVideoX(Backbone):
    """CogVideoX-2B/5B text-to-video. ``predict`` takes several prompt blocks (LayerFlow)."""

    memory_options = frozenset({"cpu_offload", "vae_tiling", "vae_slicing"})
    lora_prefix = "transformer"

    def __init__(self, path: str | None = None, tiny: bool = False, seed: int = 0, dtype: str = "fp32",
                 max_text_tokens: int | None = None, sampler: str = "dpm", tiny_layers: int = 12,
                 tiny_rotary: bool = False, gradient_checkpointing: bool = False, vae_pass: str = "clip",
                 uncond: str = "empty_prompt", denoiser_weights: Any = None) -> None:
        """``vae_pass``: "clip" encodes and decodes the packed clip in one VAE pass (as LayerFlow's
        authors do: the causal VAE sees the sub-clips in time order), "segment" each sub-clip on its
        own. ``uncond``: the unconditional text for classifier-free guidance and prompt dropout:
        "zeros" (zero embeddings, LayerFlow's released code) or "empty_prompt" (the encoded empty
        string, diffusers' ``CogVideoXPipeline``)."""
        super().__init__()
        if denoiser_weights is not None:
            raise LayerkitError("backbone.denoiser_weights was replaced by init_from: [PATH, ...] (earlier stages' "
                                "weights.safetensors, loaded in order into the model and its adapters).")
        if tiny and path not in (None, "", "???"):
            raise LayerkitError("backbone 'cogvideox' takes either tiny=true or a path, not both.")
        if vae_pass not in ("clip", "segment"):
            raise LayerkitError(f"backbone.vae_pass is '{vae_pass}'; expected clip or segment.")
        if uncond not in UNCOND:
            raise LayerkitError(f"backbone.uncond is '{uncond}'; expected one of {', '.join(UNCOND)}.")
        parts = tiny_components(seed, layers=tiny_layers, rotary=tiny_rotary) if tiny else \
            load_components(path, dtype_of(dtype, key="backbone.dtype"))
        self.setup(parts, max_text_tokens=max_text_tokens, sampler=sampler)
        self.vae_pass, self.uncond = vae_pass, uncond
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    def setup(self, parts: dict[str, Any], *, max_text_tokens: int | None = None, sampler: str = "dpm") -> None:
        transformer = parts["transformer"]
        if transformer.config.in_channels != parts["vae"].config.latent_channels:
            raise LayerkitError(
                f"this CogVideoX transformer takes {transformer.config.in_channels} input channels but the VAE has "
                f"{parts['vae'].config.latent_channels}: image-to-video checkpoints are not supported."
            )
        self.denoiser = transformer
        self.vae = parts["vae"]
        self.text_encoder = parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.scheduler_config = dict(parts["scheduler"].config)
        self.latent_channels = int(transformer.config.in_channels)
        self.spatial_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.temporal_factor = int(self.vae.config.temporal_compression_ratio)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.max_text_tokens = int(max_text_tokens or transformer.config.max_text_seq_length)
        self.sampler = sampler
        self._position_tables: dict[tuple[int, str], torch.Tensor] = {}
        self.requires_grad_(False)

    def diffusers_pipeline(self):
        """diffusers' ``CogVideoXPipeline`` over this backbone's own components and sampling
        scheduler (progress bar off): the reference layerkit's loop is checked and timed against."""
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                 transformer=self.denoiser, scheduler=self.make_scheduler("sample"))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- schedule --------------------------------------------------------------------------
    def make_scheduler(self, kind: str = "train", name: str | None = None):
        from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

        if kind == "train":
            return CogVideoXDDIMScheduler.from_config(self.scheduler_config)
        name = name or self.sampler
        if name == "ddim":
            return CogVideoXDDIMScheduler.from_config(self.scheduler_config)
        if name == "dpm":
            return CogVideoXDPMScheduler.from_config(self.scheduler_config)
        raise LayerkitError(f"cogvideox has no sampler '{name}'; use dpm (CogVideoXDPMScheduler) or ddim.")

    def scheduler_step(self, scheduler, model_output, t, sample, state, generator=None):
        from diffusers import CogVideoXDPMScheduler

        if not isinstance(scheduler, CogVideoXDPMScheduler):
            return super().scheduler_step(scheduler, model_output, t, sample, state, generator)
        # the DPM step needs the previous x0 prediction and timestep, and draws noise in [B, F, C, H, W]
        i, timesteps = state["step"], state["timesteps"]
        back = timesteps[i - 1] if i > 0 else None
        prev, state["old_pred_original_sample"] = scheduler.step(
            model_output.permute(0, 2, 1, 3, 4), state.get("old_pred_original_sample"), t, back,
            sample.permute(0, 2, 1, 3, 4), generator=generator, return_dict=False,
        )
        return prev.permute(0, 2, 1, 3, 4)

    def prepare_noise(self, shape, generator, device, dtype):
        from diffusers.utils.torch_utils import randn_tensor

        b, c, f, h, w = shape
        return randn_tensor((b, f, c, h, w), generator=generator, device=device, dtype=dtype).permute(0, 2, 1, 3, 4)

    # -- latent space ----------------------------------------------------------------------
    def frame_windows(self, num_frames: int) -> list[tuple[int, int]]:
        """The frames behind each latent frame, as ``AutoencoderKLCogVideoX`` encodes a clip: in
        chunks of ``num_sample_frames_batch_size`` frames (the remainder joins the first), each
        halved in time by every time-compressing downsampler (an odd count keeps its first
        frame on its own). Causal convolutions also let a latent frame see earlier frames."""
        size = int(getattr(self.vae, "num_sample_frames_batch_size", 8))
        stages = max(self.temporal_factor.bit_length() - 1, 0)
        chunks = max(num_frames // size, 1)
        rest = num_frames % size
        windows: list[tuple[int, int]] = []
        for i in range(chunks):
            start = size * i + (0 if i == 0 else rest)
            stop = min(size * (i + 1) + rest, num_frames)
            chunk = [(f, f + 1) for f in range(start, stop)]
            for _ in range(stages):
                if len(chunk) % 2 == 1:
                    chunk = chunk[:1] + [(a[0], b[1]) for a, b in zip(chunk[1::2], chunk[2::2], strict=True)]
                else:
                    chunk = [(a[0], b[1]) for a, b in zip(chunk[0::2], chunk[1::2], strict=True)]
            windows += chunk
        return windows

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.spatial_factor, width // self.spatial_factor

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [-1, 1] -> [B, C, f, h, w] x scaling_factor (a posterior sample in
        training, its mode otherwise)."""
        x = _conv_layout(video.permute(0, 2, 1, 3, 4).to(self.vae.dtype))
        dist = self.vae.encode(x).latent_dist
        latents = (dist.sample() if self.training else dist.mode()) * self.scaling_factor
        expected = self.latent_frames(video.shape[1])
        if latents.shape[2] != expected:
            raise LayerkitError(
                f"the CogVideoX VAE encoded {video.shape[1]} frames into {latents.shape[2]} latent frames, not "
                f"{expected}; use 1, 8k or 8k+1 frames per clip."
            )
        return latents

    # -- conditioning (zero or empty-prompt unconditional text) ------------------------------
    def encode_conditions(self, packed: Packed, latents: torch.Tensor | None = None,
                          drop: torch.Tensor | None = None) -> dict[str, Any]:
        """With ``uncond: zeros`` a dropped prompt block is zeros, and so is an empty one (a prompt the
        user left out): the unconditional text, as training drops it, not T5's encoding of ""."""
        if self.uncond == "empty_prompt":
            return super().encode_conditions(packed, latents, drop)
        blocks = torch.tensor([[not text for text in row] for row in packed.prompts], dtype=torch.bool)  # [B, K]
        if drop is not None:
            blocks = blocks | drop_blocks(drop, blocks.shape[1]).cpu()
        if not bool(blocks.any()):
            return super().encode_conditions(packed, latents)
        cond = self.encode_prompt_blocks(packed.prompts)
        embeds = cond["prompt_embeds"]
        keep = (~blocks).repeat_interleave(embeds.shape[1] // blocks.shape[1], dim=1)  # [B, K*L]
        return {**cond, "prompt_embeds": embeds * keep.to(embeds.device, embeds.dtype)[..., None]}  # dropped: zeros

    def negative_conditions(self, packed: Packed, cond: dict[str, Any], negative_prompt: str = "",
                            latents: torch.Tensor | None = None) -> dict[str, Any]:
        if self.uncond == "zeros" and not negative_prompt:
            return {**cond, "prompt_embeds": torch.zeros_like(cond["prompt_embeds"])}
        return super().negative_conditions(packed, cond, negative_prompt, latents)

    def encodes_prefix_alone(self, prefix_frames: int, num_frames: int) -> bool:
        """diffusers' CogVideoX VAE encodes a clip in chunks of ``num_sample_frames_batch_size``
        frames (8; the first takes the remainder too), each normalised on its own and handed to the
        next only through its causal convolutions' cache: a prefix that ends where a chunk ends is
        encoded as it would be alone (not under spatial tiling, which has its own split)."""
        size = int(getattr(self.vae, "num_sample_frames_batch_size", 0) or 0)
        if size <= 0 or getattr(self.vae, "use_tiling", False) or not 0 < prefix_frames <= num_frames:
            return False
        if prefix_frames == num_frames:
            return True
        first = size + num_frames % size
        return num_frames >= size and prefix_frames >= first and (prefix_frames - first) % size == 0

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.vae.decode(_conv_layout(latents.to(self.vae.dtype) / self.scaling_factor)).sample
        return frames.permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W] -> [B, F, 3, H, W]

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """T5 as in ``CogVideoXPipeline._get_t5_prompt_embeds``: [B] -> ``prompt_embeds`` [B, L, D]."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_text_tokens, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        embeds = self.text_encoder(ids.to(device))[0]
        return {"prompt_embeds": embeds.to(self.denoiser.dtype)}

    # -- the denoiser ----------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """[B, C, f, h, w] -> model output (v) [B, C, f, h, w]. ``cond``: ``prompt_embeds`` [B, K*L, D]
        and optionally ``prompt_block_index`` [K*L], published to adapters in ``context.extras``."""
        config = self.denoiser.config
        _, _, f, h, w = noisy.shape
        if config.patch_size_t is not None and f % config.patch_size_t:
            raise LayerkitError(f"this CogVideoX transformer needs a multiple of {config.patch_size_t} latent frames; got {f}.")
        text = cond["prompt_embeds"].to(noisy.dtype)
        rotary = self.rotary_embedding(f, h, w, noisy.device) if config.use_rotary_positional_embeddings else None
        with self.text_positions(text.shape[1], noisy.device), self.publish(cond):
            out = self.denoiser(hidden_states=noisy.permute(0, 2, 1, 3, 4), encoder_hidden_states=text,
                                timestep=timesteps, image_rotary_emb=rotary, return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)

    @contextlib.contextmanager
    def publish(self, cond: dict[str, Any]) -> Iterator[None]:
        """Expose ``prompt_block_index`` to adapters (LayerFlow's layer embedding) for one call."""
        index = cond.get("prompt_block_index")
        saved = self.context.extras
        if index is not None:
            self.context.extras = {**saved, "prompt_block_index": index}
        try:
            yield
        finally:
            self.context.extras = saved

    @contextlib.contextmanager
    def text_positions(self, text_length: int, device: torch.device) -> Iterator[None]:
        """CogVideoX-2B's sincos table spans ``max_text_seq_length`` (226) text tokens, all zero,
        then the video patches. With K prompt blocks the text is K*L tokens: use a table with
        K*L zero text rows, so every video patch keeps its position (as LayerFlow does)."""
        embed = self.denoiser.patch_embed
        if not embed.use_positional_embeddings or text_length == embed.max_text_seq_length:
            yield
            return
        if embed.use_learned_positional_embeddings:
            raise LayerkitError(f"this CogVideoX transformer has learned positions for {embed.max_text_seq_length} "
                                f"text tokens; it cannot take {text_length}.")
        key = (text_length, str(device))
        saved = embed.max_text_seq_length, embed.pos_embedding
        embed.max_text_seq_length = text_length
        if key not in self._position_tables:
            self._position_tables[key] = embed._get_positional_embeddings(
                embed.sample_height, embed.sample_width, embed.sample_frames, device=device)
        embed.pos_embedding = self._position_tables[key]
        try:
            yield
        finally:
            embed.max_text_seq_length, embed.pos_embedding = saved

    def rotary_embedding(self, f: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` for latents of f x h x w."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        config = self.denoiser.config
        p, p_t = config.patch_size, config.patch_size_t
        grid_h, grid_w = h // p, w // p
        base_w, base_h = config.sample_width // p, config.sample_height // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops,
                                           grid_size=(grid_h, grid_w), temporal_size=f, device=device)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None,
                                       grid_size=(grid_h, grid_w), temporal_size=(f + p_t - 1) // p_t,
                                       grid_type="slice", max_size=(base_h, base_w), device=device)

    # -- memory ----------------------------------------------------------------------------
    def components_for_offload(self) -> list[nn.Module]:
        return [self.text_encoder, self.denoiser, self.vae]

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()
