"""The contracts between the core and the plugins: backbone, control, adapter, task.

Shapes use the papers' letters: B batch, N layers, S sub-clips (segments), F frames,
C channels, H x W pixels; lower-case f, h, w are latent sizes.

Data flow (training and sampling share it up to the loss)::

    batch --task.pack--> Packed --backbone.encode_video per segment--> latents [B, C, f, h, w]
          --controls--> StepContext.controls --backbone.predict (+ adapters)--> model output
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError


# ----------------------------------------------------------------------------------------
# what a task hands to the core
# ----------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One sub-clip of the packed sequence (LayerFlow concatenates layers along time).

    ``video`` is [B, F, 3, H, W] in [-1, 1]; at sampling time a generated segment may carry
    ``video=None`` and only its ``num_frames``.
    """

    name: str
    num_frames: int
    video: torch.Tensor | None = None


@dataclass
class Packed:
    """A batch as the backbone sees it.

    segments: sub-clips in time order; their latents are concatenated along frames.
    given: [B, S] bool; a given segment is never noised, is re-imposed at every sampling
        step, takes part in attention and is left out of the loss.
    prompts: per sample, one prompt per prompt block ([B][K]); each block is encoded on its
        own and the blocks are concatenated along tokens (LayerFlow's layer-wise prompts).
    scales: per-sample adapter scales, name -> [B] (e.g. Motion LoRA 1 static / 0 dynamic).
    extras: anything a control or adapter of this task needs (masks, validity, indices).
    """

    segments: list[Segment]
    given: torch.Tensor
    prompts: list[list[str]]
    height: int
    width: int
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.given.shape[0]

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise LayerkitError(f"the packed batch has no segment '{name}'; it has {[s.name for s in self.segments]}.")


# ----------------------------------------------------------------------------------------
# per-step state shared by the core with controls and adapters
# ----------------------------------------------------------------------------------------
class StepContext:
    """What adapters may read while the backbone runs one forward pass.

    The core fills it before each ``backbone.predict`` (training step or sampling step):
    ``batch_size`` (B of the call, after classifier-free-guidance doubling),
    ``num_frames`` (latent frames f in the call), ``scales`` (adapter name -> [B]),
    ``controls`` (control name -> whatever the control produced), ``extras`` (task extras).
    """

    def __init__(self) -> None:
        self.batch_size: int = 0
        self.num_frames: int = 0
        self.scales: dict[str, torch.Tensor] = {}
        self.controls: dict[str, Any] = {}
        self.extras: dict[str, Any] = {}
        self.active = False

    @contextlib.contextmanager
    def use(
        self,
        *,
        batch_size: int,
        num_frames: int,
        scales: dict[str, torch.Tensor] | None = None,
        controls: dict[str, Any] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> Iterator[StepContext]:
        saved = (self.batch_size, self.num_frames, self.scales, self.controls, self.extras, self.active)
        self.batch_size, self.num_frames = batch_size, num_frames
        self.scales, self.controls, self.extras = scales or {}, controls or {}, extras or {}
        self.active = True
        try:
            yield self
        finally:
            (self.batch_size, self.num_frames, self.scales, self.controls, self.extras, self.active) = saved

    def scale_for(self, name: str, rows: int, default: float = 1.0) -> torch.Tensor | float:
        """The per-sample scale of adapter ``name`` broadcast to ``rows`` leading rows.

        Backbones fold frames or layers into the batch ([B*F, L, D]); a scale given per
        sample [B] is repeated to match (``rows`` must be a multiple of B).
        """
        scale = self.scales.get(name)
        if scale is None:
            return default
        if rows % scale.shape[0] != 0:
            raise LayerkitError(
                f"adapter '{name}' got {scale.shape[0]} per-sample scales for a call with {rows} rows."
            )
        return scale.repeat_interleave(rows // scale.shape[0])


def expand_for_cfg(values: dict[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """Repeat per-sample tensors for classifier-free guidance (``[uncond; cond]`` batches)."""
    return {k: torch.cat([v] * copies, dim=0) for k, v in values.items()}


# ----------------------------------------------------------------------------------------
# backbone
# ----------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A denoiser family: denoiser, VAE, text encoder, noise schedule, attach points.

    Subclasses set ``denoiser`` (the module adapters attach to) and implement the
    encode/decode/predict verbs. Everything is frozen by default; ``trainable`` patterns
    from the config (matched against ``denoiser`` parameter names) open parts for training.
    """

    #: "epsilon" | "v_prediction" | "sample"; read from the scheduler when one exists
    latent_channels: int = 4
    #: memory options this backbone honours (subset of: cpu_offload, vae_tiling, vae_slicing)
    memory_options: frozenset[str] = frozenset()
    denoiser: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.context = StepContext()

    # -- schedule --------------------------------------------------------------------------
    def make_scheduler(self, kind: str = "train", name: str | None = None) -> Any:
        """A diffusers scheduler for training (``kind="train"``) or sampling."""
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        return self.make_scheduler("train").config.prediction_type

    def scheduler_step(self, scheduler: Any, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
                       state: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """One scheduler update; a backbone whose scheduler needs more (state) overrides this."""
        kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        return scheduler.step(model_output, t, sample, **kwargs, return_dict=False)[0]

    def prepare_noise(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """Initial noise [B, C, f, h, w]; a backbone whose reference pipeline draws noise in
        another layout overrides this so seeds match that pipeline."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # -- latent space ----------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a clip of ``num_frames`` (temporal compression)."""
        return num_frames

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [-1, 1] -> latents [B, C, f, h, w] (scaled for the denoiser)."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, f, h, w] -> [B, F, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode one prompt per sample -> e.g. ``{"prompt_embeds": [B, L, D]}``."""
        raise NotImplementedError

    def encode_prompt_blocks(self, prompts: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """Encode K prompt blocks per sample, each on its own, concatenated along tokens.

        Returns ``prompt_embeds`` [B, K*L, D] and ``prompt_block_index`` [K*L] (the block of
        each token), which LayerFlow's layer embedding reads.
        """
        counts = {len(p) for p in prompts}
        if len(counts) != 1:
            raise LayerkitError(f"every sample needs the same number of prompts; got counts {sorted(counts)}.")
        k = counts.pop()
        blocks = [self.encode_prompts([p[i] for p in prompts]) for i in range(k)]
        out: dict[str, torch.Tensor] = {}
        for key in blocks[0]:
            out[key] = torch.cat([b[key] for b in blocks], dim=1) if blocks[0][key].dim() >= 2 else blocks[0][key]
        length = blocks[0]["prompt_embeds"].shape[1]
        out["prompt_block_index"] = torch.arange(k, device=out["prompt_embeds"].device).repeat_interleave(length)
        return out

    # -- the denoiser ----------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """Model output for noisy latents [B, C, f, h, w] at ``timesteps`` [B]."""
        raise NotImplementedError

    def attach_points(self) -> dict[str, nn.Module]:
        """Named places where adapters and controls may attach (default: the denoiser)."""
        return {"denoiser": self.denoiser}

    # -- memory ----------------------------------------------------------------------------
    def components_for_offload(self) -> list[nn.Module]:
        """Sub-models in the order they run, for model CPU offload."""
        return [self.denoiser]

    @property
    def execution_device(self) -> torch.device:
        """Where the computation runs: the offload device under model CPU offload (the weights
        wait on the CPU between uses), otherwise where the weights are."""
        offload = self.__dict__.get("_offload_device")
        return offload if offload is not None else next(self.parameters()).device

    def enable_memory_options(self, options: dict[str, bool], device: torch.device) -> None:
        wanted = {k for k, v in options.items() if v}
        unsupported = wanted - set(self.memory_options)
        if unsupported:
            raise LayerkitError(
                f"backbone {type(self).__name__} does not support {sorted(unsupported)}; "
                f"it supports {sorted(self.memory_options) or 'none'}."
            )
        if "cpu_offload" in wanted:
            from accelerate import cpu_offload_with_hook

            hook = None
            for module in self.components_for_offload():
                _, hook = cpu_offload_with_hook(module, device, prev_module_hook=hook)
            self._offload_device = torch.device(device)
        if "vae_tiling" in wanted:
            self.enable_vae_tiling()
        if "vae_slicing" in wanted:
            self.enable_vae_slicing()

    def enable_vae_tiling(self) -> None:  # pragma: no cover - backbones that support it override
        raise LayerkitError(f"backbone {type(self).__name__} has no VAE tiling.")

    def enable_vae_slicing(self) -> None:  # pragma: no cover
        raise LayerkitError(f"backbone {type(self).__name__} has no VAE slicing.")

    # -- weights ---------------------------------------------------------------------------
    def set_trainable(self, patterns: Sequence[str]) -> list[str]:
        """Freeze everything, then open denoiser parameters whose name contains a pattern.

        ``"*"`` opens the whole denoiser. Returns the names opened.
        """
        self.requires_grad_(False)
        opened = []
        for name, param in self.denoiser.named_parameters():
            if any(p == "*" or p in name for p in patterns):
                param.requires_grad_(True)
                opened.append(name)
        if patterns and not opened:
            raise LayerkitError(f"no denoiser parameter matches the trainable patterns {list(patterns)}.")
        return opened


# ----------------------------------------------------------------------------------------
# control and adapter
# ----------------------------------------------------------------------------------------
class Control(nn.Module):
    """One per-layer control signal: ``prepare`` (non-learned, runs in the data loader on one
    sample) and ``forward`` (learned, runs on the packed batch and returns what the adapters
    fusing it read from ``StepContext.controls[name]``)."""

    name: str = "control"
    #: batch keys (after ``prepare``) the core copies into ``Packed.extras`` for ``forward``
    inputs: tuple[str, ...] = ()

    def prepare(self, sample: dict[str, Any]) -> dict[str, Any]:
        return sample

    def forward(self, packed: Packed, backbone: Backbone, noisy: torch.Tensor, timesteps: torch.Tensor) -> Any:
        """Per call: noisy latents [B, C, f, h, w] and timesteps [B]; a control that ignores
        them (LayerAnimate's Layer ControlNet) may compute its features from ``packed`` alone."""
        raise NotImplementedError


class Adapter(nn.Module):
    """A change to backbone modules with its own weights and its own scale.

    ``attach`` installs it (attention processors, peft layers, hooks) and ``detach`` removes
    it, restoring the backbone exactly. Parameters registered on the adapter itself (or
    returned by ``trainable_parameters``) are trained; ``state_dict``/``load_state_dict`` save
    and load them; ``export`` writes formats other tools read.
    """

    name: str = "adapter"

    def __init__(self) -> None:
        super().__init__()
        self.attached = False
        self.scale: float = 1.0

    def attach(self, backbone: Backbone) -> None:
        raise NotImplementedError

    def detach(self, backbone: Backbone) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own weights (flat, safetensors-ready)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LayerkitError(
                f"adapter '{self.name}' weights do not match: missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}."
            )

    def export(self, backbone: Backbone, directory: str, formats: Sequence[str]) -> list[str]:
        return []


# ----------------------------------------------------------------------------------------
# task
# ----------------------------------------------------------------------------------------
class Task:
    """What a sample means: its schema, how it is packed, how outputs are unpacked and written."""

    name: str = "task"
    #: keys a training sample must carry
    sample_keys: tuple[str, ...] = ()

    def pack(self, batch: dict[str, Any], *, training: bool) -> Packed:
        raise NotImplementedError

    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
        """Samples for sampling, built from user inputs (prompts, files); the core runs the
        controls' ``prepare`` on each and collates them like training samples."""
        raise NotImplementedError

    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Decoded segments (name -> [B, F, 3, H, W] in [-1, 1]) -> per sample, layer name ->
        [F, C, H, W] in [0, 1] with C = 3 (RGB), 4 (RGBA) or 1 (matte)."""
        raise NotImplementedError

    def validate_batch(self, batch: dict[str, Any]) -> None:
        missing = [k for k in self.sample_keys if k not in batch]
        if missing:
            raise LayerkitError(f"task '{self.name}' needs sample keys {missing}, which the dataset does not provide.")
