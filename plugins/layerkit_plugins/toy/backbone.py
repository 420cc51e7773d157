"""``toy.dit``: a tiny denoiser in pixel space for the shapes world.

The "VAE" is a space-to-depth rearrangement (2x2 pixels -> 12 channels), the denoiser is a
diffusers ``CogVideoXTransformer3DModel`` built from a tiny config (joint attention over text
and every frame of the packed sequence), the text encoder is a trainable word embedding.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layerkit.protocols import Backbone


class WordEncoder(nn.Module):
    """Words hashed into buckets -> embeddings + positions: [B] prompts -> [B, L, D]."""

    def __init__(self, dim: int, max_tokens: int = 16, buckets: int = 1024) -> None:
        super().__init__()
        self.max_tokens, self.buckets = max_tokens, buckets
        self.embed = nn.Embedding(buckets + 1, dim)  # bucket 0 is padding
        self.position = nn.Parameter(torch.zeros(max_tokens, dim))
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = prompt.lower().replace(",", " , ").split()[: self.max_tokens]
            for j, word in enumerate(words):
                ids[i, j] = 1 + zlib.crc32(word.encode()) % self.buckets
        return ids

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.embed.weight.device)
        return self.norm(self.embed(ids) + self.position)


class ToyDiT(Backbone):
    latent_channels = 12
    memory_options = frozenset({"cpu_offload"})

    def __init__(self, hidden: int = 64, heads: int = 4, layers: int = 4, text_tokens: int = 16,
                 sample_size: int = 32, prompt_blocks: int = 3, seed: int = 0, prediction_type: str = "v_prediction",
                 num_train_timesteps: int = 1000, trainable_text: bool = True) -> None:
        super().__init__()
        from diffusers import CogVideoXTransformer3DModel

        torch.manual_seed(seed)  # the frozen base is reproducible from the config alone
        self.denoiser = CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=12, out_channels=12,
            time_embed_dim=hidden, text_embed_dim=hidden, num_layers=layers, sample_width=sample_size // 2,
            sample_height=sample_size // 2, sample_frames=9, patch_size=2, temporal_compression_ratio=1,
            max_text_seq_length=text_tokens * prompt_blocks, use_rotary_positional_embeddings=False,
        )
        self.text_encoder = WordEncoder(hidden, text_tokens)
        self.prediction_type_name = prediction_type
        self.num_train_timesteps = num_train_timesteps
        self.trainable_text = trainable_text

    def set_trainable(self, patterns: Sequence[str]) -> list[str]:
        opened = super().set_trainable(patterns)
        if patterns and self.trainable_text:
            self.text_encoder.requires_grad_(True)
        return opened

    def make_scheduler(self, kind: str = "train", name: str | None = None):
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        common = dict(num_train_timesteps=self.num_train_timesteps, beta_schedule="scaled_linear",
                      beta_start=0.00085, beta_end=0.012, prediction_type=self.prediction_type_name,
                      rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if kind == "train":
            return DDPMScheduler(**common, clip_sample=False)
        if name in (None, "ddim"):
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
        if name == "dpm++":
            common.pop("rescale_betas_zero_snr")
            return DPMSolverMultistepScheduler(**common)
        from layerkit.errors import LayerkitError

        raise LayerkitError(f"toy.dit has no sampler '{name}'; use ddim or dpm++.")

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // 2, width // 2

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        b, f = video.shape[:2]
        x = F.pixel_unshuffle(video.flatten(0, 1).to(self.denoiser.dtype), 2)  # [B*F, 12, H/2, W/2]
        return x.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f = latents.shape[:3]
        x = F.pixel_shuffle(latents.permute(0, 2, 1, 3, 4).flatten(0, 1), 2)
        return x.unflatten(0, (b, f))

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.text_encoder(prompts)}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        text = cond["prompt_embeds"].to(noisy.dtype)
        room = self.denoiser.config.max_text_seq_length - text.shape[1]
        if room < 0:
            from layerkit.errors import LayerkitError

            raise LayerkitError(
                f"toy.dit takes at most {self.denoiser.config.max_text_seq_length} text tokens "
                f"({self.denoiser.config.max_text_seq_length // self.text_encoder.max_tokens} prompt blocks); got {text.shape[1]}."
            )
        text = F.pad(text, (0, 0, 0, room))  # the sincos position table spans a fixed text length
        out = self.denoiser(
            hidden_states=noisy.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=text,
            timestep=timesteps,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    def components_for_offload(self) -> list[nn.Module]:
        return [self.text_encoder, self.denoiser]
