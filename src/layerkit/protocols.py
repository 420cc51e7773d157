"""The contracts between the core and the plugins: backbone, control, adapter, task, stage.

Shapes use the papers' letters: B batch, N layers, S sub-clips (segments), F frames,
C channels, H x W pixels; lower-case f, h, w are latent sizes; R rows of one denoiser call
(R = copies x B: classifier-free guidance stacks ``[uncond; cond]``).

Data flow (training and sampling share it up to the loss)::

    batch --task.pack--> Packed --backbone.encode_video (one pass or per segment)--> latents [B, C, f, h, w]
          --backbone.encode_conditions--> cond (prompt embeddings, image tokens, ...)
          --controls(Step)--> StepContext.controls --backbone.predict (+ adapters)--> model output [R, C, f, h, w]

What a task gives is marked per pixel frame (``Packed.given`` [B, F]); the backbone maps it to
latent frames (:meth:`Backbone.latent_given`) and decides how given frames enter: re-imposed
clean at every step and left out of the loss (``given_mode = "reimpose"``: LayerFlow's given
clips, Layer-Animate's middle frame) or as concatenated conditioning while every frame is
denoised (``given_mode = "condition"``: ToonCrafter's image latent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError

#: the one dtype table: config names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def dtype_of(name: str, *, key: str = "dtype") -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; an unknown name is one sentence naming ``key``."""
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise LayerkitError(f"{key} '{name}' is not one of {', '.join(DTYPES)}.") from None


# ----------------------------------------------------------------------------------------
# what a task hands to the core
# ----------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One sub-clip of the packed sequence (LayerFlow concatenates layers along time).

    ``video`` is [B, F_s, C, H, W] in [-1, 1] (C = 3, or 4 for RGBA backbones); at sampling a
    segment nothing of which is given may carry ``video=None`` and only its ``num_frames``.
    Frames of a segment that are not given may hold anything (zeros) at sampling.
    """

    name: str
    num_frames: int
    video: torch.Tensor | None = None


@dataclass
class Packed:
    """A batch as the backbone sees it.

    segments: sub-clips in time order; their frames are concatenated (F = sum of F_s).
    given: [B, F] bool per pixel frame: frames the task gives (a clean LayerFlow clip, the
        middle frame of Layer-Animate, the first/last frame of image-to-video/interpolation).
        The backbone maps it to latent frames and decides how given frames enter (see module doc).
    prompts: per sample, one prompt per prompt block ([B][K]); each block is encoded on its
        own and the blocks are concatenated along tokens (LayerFlow's layer-wise prompts).
    scales: per-sample adapter scales, name -> [B] (e.g. Motion LoRA 1 static / 0 dynamic).
    extras: per-sample inputs of controls and adapters (masks, validity, indices); tensors with
        a leading B are repeated for classifier-free guidance rows.
    conditions: inputs of the backbone's own conditioning (e.g. ``fps`` [B]); read by
        :meth:`Backbone.encode_conditions`.
    loss_region: optional [B, F, H, W] in [0, 1] per pixel frame: where the training loss may weigh
        more (``train.region_loss_weight``), e.g. a layered task's sprite matte; None: nowhere.
    latent_norm: optional segment name -> (mean [C], std [C]): the latents of that segment's latent
        frames are diffused as (z - mean) / std per channel (:func:`layerkit.pipeline.encode_packed`
        applies it, :func:`~layerkit.pipeline.decode_packed` undoes it); segments not named keep the
        backbone's latents. For layers whose latents sit far below the noise's unit scale (a matte).
    latent_residual: optional segment name -> base segment name: that segment's latents are diffused
        as their difference from the base segment's (before any ``latent_norm``; decoding adds the
        base back). For a layer that equals another wherever a third does not reach (a background
        and the blended scene, away from the sprite): their agreement there is then the denoiser's
        default, not something two independent predictions must meet.
    """

    segments: list[Segment]
    given: torch.Tensor
    prompts: list[list[str]]
    height: int
    width: int
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)
    loss_region: torch.Tensor | None = None
    latent_norm: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    latent_residual: dict[str, str] | None = None

    def __post_init__(self) -> None:
        total = sum(s.num_frames for s in self.segments)
        if self.given.dim() != 2 or self.given.shape[1] != total:
            raise LayerkitError(
                f"Packed.given must be [B, F] over the {total} frames of the segments; got {tuple(self.given.shape)}."
            )
        self.given = self.given.bool()
        if self.loss_region is not None and (self.loss_region.dim() != 4 or tuple(self.loss_region.shape) != (
                self.given.shape[0], total, self.height, self.width)):
            raise LayerkitError(f"Packed.loss_region must be [B, F, H, W] = [{self.given.shape[0]}, {total}, "
                                f"{self.height}, {self.width}]; got {tuple(self.loss_region.shape)}.")

    @property
    def batch_size(self) -> int:
        return self.given.shape[0]

    @property
    def num_frames(self) -> int:
        return self.given.shape[1]

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise LayerkitError(f"the packed batch has no segment '{name}'; it has {[s.name for s in self.segments]}.")

    def segment_frames(self) -> list[int]:
        return [s.num_frames for s in self.segments]

    def given_segment(self, name: str) -> torch.Tensor:
        """[B] True where every frame of segment ``name`` is given."""
        start = 0
        for seg in self.segments:
            if seg.name == name:
                return self.given[:, start : start + seg.num_frames].all(dim=1)
            start += seg.num_frames
        raise LayerkitError(f"the packed batch has no segment '{name}'.")


def drop_blocks(drop: torch.Tensor, blocks: int) -> torch.Tensor:
    """A prompt-dropout mask [B] (whole samples) or [B, K] (blocks) as [B, K] bool."""
    drop = drop.bool()
    return drop[:, None].expand(-1, blocks) if drop.dim() == 1 else drop


def given_per_frame(segment_given: torch.Tensor, frames: Sequence[int]) -> torch.Tensor:
    """[B, S] bool per segment -> [B, F] per frame (every frame of a given segment given)."""
    return torch.cat([segment_given[:, i : i + 1].expand(-1, n) for i, n in enumerate(frames)], dim=1)


# ----------------------------------------------------------------------------------------
# one denoiser call, as controls see it; per-call state adapters read
# ----------------------------------------------------------------------------------------
@dataclass
class Step:
    """The inputs of one denoiser call (a training step or one sampling step).

    noisy: [R, C, f, h, w]; timesteps: [R]; cond: the conditioning of every row (under
    classifier-free guidance ``[uncond; cond]``: the unconditional half has its own text and
    image conditioning); extras: ``Packed.extras`` with per-sample tensors repeated to R;
    copies: R // B.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: dict[str, Any]
    extras: dict[str, Any]
    copies: int = 1

    @property
    def rows(self) -> int:
        return self.noisy.shape[0]

    def half(self, index: int) -> Step:
        """The rows of one guidance copy (0 = unconditional under CFG, copies-1 = conditional)."""
        b = self.rows // self.copies
        return Step(self.noisy[index * b:(index + 1) * b], self.timesteps[index * b:(index + 1) * b],
                    slice_rows(self.cond, index, b, self.rows), slice_rows(self.extras, index, b, self.rows), 1)


def repeat_rows(tree: Any, copies: int, rows: int) -> Any:
    """Repeat every tensor whose leading dimension is ``rows`` ``copies`` times (CFG rows)."""
    if copies == 1:
        return tree
    if isinstance(tree, torch.Tensor):
        return torch.cat([tree] * copies, dim=0) if tree.dim() > 0 and tree.shape[0] == rows else tree
    if isinstance(tree, dict):
        return {k: repeat_rows(v, copies, rows) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(repeat_rows(v, copies, rows) for v in tree)
    return tree


def slice_rows(tree: Any, index: int, b: int, rows: int) -> Any:
    """Rows ``[index*b, (index+1)*b)`` of every tensor whose leading dimension is ``rows``."""
    if isinstance(tree, torch.Tensor):
        return tree[index * b:(index + 1) * b] if tree.dim() > 0 and tree.shape[0] == rows else tree
    if isinstance(tree, dict):
        return {k: slice_rows(v, index, b, rows) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(slice_rows(v, index, b, rows) for v in tree)
    return tree


class StepContext:
    """What adapters may read while the backbone runs one forward pass.

    The core fills it before each ``backbone.predict``: ``batch_size`` (R, the rows of the
    call), ``num_frames`` (latent frames f), ``scales`` (adapter name -> [R]), ``controls``
    (what the controls provide, by the names they declare in ``provides``), ``extras``
    (task extras, rows repeated to R).
    """

    def __init__(self) -> None:
        self.batch_size: int = 0
        self.num_frames: int = 0
        self.scales: dict[str, torch.Tensor] = {}
        self.controls: dict[str, Any] = {}
        self.extras: dict[str, Any] = {}
        self.active = False

    @contextlib.contextmanager
    def use(self, *, batch_size: int, num_frames: int, scales: dict[str, torch.Tensor] | None = None,
            controls: dict[str, Any] | None = None, extras: dict[str, Any] | None = None) -> Iterator[StepContext]:
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

        Backbones fold frames or layers into the batch ([R*F, L, D]); a scale given per row
        [R] is repeated to match (``rows`` must be a multiple of R).
        """
        scale = self.scales.get(name)
        if scale is None:
            return default
        if rows % scale.shape[0] != 0:
            raise LayerkitError(
                f"adapter '{name}' got {scale.shape[0]} per-sample scales for a call with {rows} rows."
            )
        return scale.repeat_interleave(rows // scale.shape[0])


# ----------------------------------------------------------------------------------------
# backbone
# ----------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A denoiser family: denoiser, VAE, encoders, noise schedule, checkpoint loaders.

    Subclasses set ``denoiser`` (the module adapters attach to) and implement the
    encode/decode/predict verbs. Everything is frozen by default; ``trainable`` patterns
    from the config (matched against ``denoiser`` parameter names) open parts for training.
    """

    latent_channels: int = 4
    #: memory options this backbone honours (subset of: cpu_offload, vae_tiling, vae_slicing)
    memory_options: frozenset[str] = frozenset()
    #: how given frames enter: "reimpose" (kept clean every step, out of the loss) or
    #: "condition" (the backbone's conditioning carries them; every frame is denoised and in the loss)
    given_mode: str = "reimpose"
    #: how a packed clip meets the VAE: "clip" (one pass over all segments in time order) or
    #: "segment" (each sub-clip on its own); the same for a per-frame (2-D) VAE
    vae_pass: str = "clip"
    #: (frames, height, width) sampled when ``sampler.num_frames/height/width`` are null (e.g.
    #: ToonCrafter: 16 x 320 x 512; a model tied to its frame count has no other choice)
    native_size: tuple[int, int, int] | None = None
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
    def frame_windows(self, num_frames: int) -> list[tuple[int, int]]:
        """The pixel frames ``[start, stop)`` behind each latent frame of a clip of
        ``num_frames`` encoded in one pass (no temporal compression: one frame each)."""
        return [(i, i + 1) for i in range(num_frames)]

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a clip of ``num_frames`` encoded in one pass."""
        return len(self.frame_windows(num_frames))

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] in [-1, 1] -> latents [B, C', f, h, w] (scaled for the denoiser): a draw
        of a VAE's posterior while the backbone is in training mode (``self.training``), its mode
        otherwise (a latent cache encodes with the flag off: :mod:`layerkit.training.cache`)."""
        raise NotImplementedError

    def encodes_prefix_alone(self, prefix_frames: int, num_frames: int) -> bool:
        """Whether one pass over ``num_frames`` frames encodes the first ``prefix_frames`` exactly
        as a pass that sees those frames alone (a causal VAE that encodes in chunks, split there):
        a given prefix then needs no pass of its own in training (:func:`layerkit.pipeline.encode_packed`)."""
        return False

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, f, h, w] -> [B, F, C', H, W] in [-1, 1]."""
        raise NotImplementedError

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode one prompt per sample -> e.g. ``{"prompt_embeds": [B, L, D]}``."""
        raise NotImplementedError

    def encode_prompt_blocks(self, prompts: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """Encode K prompt blocks per sample, each on its own, concatenated along tokens.

        Returns ``prompt_embeds`` [B, K*L, D] and ``prompt_block_index`` [1, K*L] (the block of
        each token, the same for every sample), which LayerFlow's layer embedding reads.
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
        out["prompt_block_index"] = torch.arange(k, device=out["prompt_embeds"].device).repeat_interleave(length)[None]
        return out

    def encode_conditions(self, packed: Packed, latents: torch.Tensor | None = None,
                          drop: torch.Tensor | None = None) -> dict[str, Any]:
        """The denoiser's conditioning for the B samples of ``packed``: prompt embeddings and
        whatever else the backbone needs (image tokens, concatenated image latents, fps).

        ``latents`` [B, C, f, h, w] are the packed clip's latents where the caller has them
        (given frames are valid). ``drop`` marks conditioning replaced by the unconditional one
        (prompt dropout for classifier-free guidance): [B] whole samples, or [B, K] prompt blocks.
        """
        prompts = packed.prompts
        if drop is not None and bool(drop.any()):
            rows = drop_blocks(drop, len(prompts[0])).tolist()
            prompts = [["" if d else p for p, d in zip(row, flags, strict=True)] for row, flags in zip(prompts, rows, strict=True)]
        return self.encode_prompt_blocks(prompts)

    def negative_conditions(self, packed: Packed, cond: dict[str, Any], negative_prompt: str = "",
                            latents: torch.Tensor | None = None) -> dict[str, Any]:
        """The unconditional half of classifier-free guidance, shaped like ``cond``."""
        return self.encode_prompt_blocks([[negative_prompt] * len(row) for row in packed.prompts])

    # -- the denoiser ----------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """Model output for noisy latents [R, C, f, h, w] at ``timesteps`` [R]."""
        raise NotImplementedError

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

        ``"*"`` opens the whole denoiser; ``"re:EXPR"`` opens names a regular expression matches
        (``re.search``). Returns the names opened.
        """
        import re

        self.requires_grad_(False)
        opened = []
        regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]
        plain = [p for p in patterns if not p.startswith("re:")]
        for name, param in self.denoiser.named_parameters():
            if any(p == "*" or p in name for p in plain) or any(r.search(name) for r in regexes):
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
    sample) and ``forward`` (learned, runs on each denoiser call).

    ``forward(step, backbone)`` receives the whole call (:class:`Step`: every guidance row with
    its own conditioning, as diffusers' ControlNet pipelines give a ControlNet) and returns a
    mapping from the names in ``provides`` to what adapters read from
    ``StepContext.controls``. A control whose output does not depend on the guidance half sets
    ``guidance_independent = True``: the core then runs it on the conditional rows only and
    repeats the result.
    """

    name: str = "control"
    #: batch keys (after ``prepare``) the core copies into ``Packed.extras`` for ``forward``
    inputs: tuple[str, ...] = ()
    #: the names this control's output is published under (adapters declare them in ``reads``)
    provides: tuple[str, ...] = ()
    guidance_independent: bool = False

    def prepare(self, sample: dict[str, Any]) -> dict[str, Any]:
        return sample

    def forward(self, step: Step, backbone: Backbone) -> dict[str, Any]:
        raise NotImplementedError


class Adapter(nn.Module):
    """A change to backbone modules with its own weights and its own scale.

    ``attach`` installs it (attention processors, peft layers, hooks) and ``detach`` removes
    it, restoring the backbone exactly. Parameters registered on the adapter itself (or
    returned by ``trainable_parameters``) are trained; ``state_dict``/``load_state_dict`` save
    and load them; ``export`` writes formats other tools read. ``reads`` names the control
    outputs it fuses (checked against the controls' ``provides`` when the parts are built).
    """

    name: str = "adapter"
    reads: tuple[str, ...] = ()

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

    def owns_key(self, key: str) -> bool:
        """True when a trainable-state key (as ``weights.safetensors`` names it) belongs to this
        adapter; keys of an adapter left out at sampling (``inference: false``) are skipped."""
        return key.startswith(f"adapters.{self.name}.")

    def map_key(self, key: str, own: Any) -> str | None:
        """Where a weight of an earlier stage goes once this adapter is attached (e.g. a layer a
        LoRA wraps keeps its weight under ``base_layer``); None when this adapter has no say.
        ``own`` is the container of the model's current key names."""
        return None

    def export(self, backbone: Backbone, directory: str, formats: Sequence[str]) -> list[str]:
        return []


# ----------------------------------------------------------------------------------------
# task and stage
# ----------------------------------------------------------------------------------------
class Task:
    """What a sample means: how it is packed, which inputs it takes, how outputs are unpacked,
    collated and (in the shapes world) evaluated."""

    name: str = "task"
    #: the ``inputs.*`` keys ``sample_inputs`` understands (anything else is refused)
    input_keys: tuple[str, ...] = ("num_samples", "seed", "prompt")
    #: those of them that name a file or folder: checked to exist before any model loads
    file_keys: tuple[str, ...] = ()
    #: whether ``pack(..., training=True)`` marks ``Packed.loss_region`` (what ``train.region_loss_weight`` weighs)
    marks_loss_region: bool = False
    #: every segment name its batches may pack (e.g. LayerFlow's layers and the frame-0 copy); () unknown.
    #: ``train.segment_loss_weights`` is checked against them when the module is built
    segment_names: tuple[str, ...] = ()
    #: the ``Packed.latent_norm`` its batches carry (segment -> (mean, std)); weights trained with one
    #: record it and load only into a task with the same (:func:`layerkit.pipeline.load_trainable_state`)
    latent_norm: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the latent residuals its batches may carry (segment -> base segment, ``Packed.latent_residual``);
    #: recorded and checked at load as ``latent_norm`` is
    latent_residual: dict[str, str] | None = None

    def pack(self, batch: dict[str, Any], *, training: bool) -> Packed:
        raise NotImplementedError

    def sample_inputs(self, inputs: dict[str, Any], *, height: int, width: int, num_frames: int) -> list[dict[str, Any]]:
        """Samples for sampling, built from user inputs (prompts, files); the core runs the
        controls' ``prepare`` on each and collates them like training samples. When the user
        gives any input, nothing of the shapes world is mixed in."""
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch from samples (training and sampling alike)."""
        from layerkit.training.data import default_collate

        return default_collate(samples)

    def unpack(self, decoded: dict[str, torch.Tensor], batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Decoded segments (name -> [B, F_s, C, H, W] in [-1, 1]) -> per sample, layer name ->
        [F, C, H, W] in [0, 1] with C = 3 (RGB), 4 (RGBA) or 1 (matte)."""
        raise NotImplementedError

    def evaluate_samples(self, outputs: list[dict[str, torch.Tensor]],
                         batch: dict[str, Any]) -> list[dict[str, float]] | None:
        """Per sample, metrics against ground truth, when the samples came from the shapes world;
        else None (``layerkit sample`` records them beside their means: which prompts failed)."""
        return None

    def evaluate(self, outputs: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> dict[str, float] | None:
        """Metrics against ground truth, when the samples came from the shapes world; else None.
        By default the mean of each of :meth:`evaluate_samples`' figures over the samples that have it."""
        rows = self.evaluate_samples(outputs, batch)
        if not rows:
            return None
        from layerkit.data.evaluate import summarise

        return summarise(rows)


class Stage:
    """A sampling step that runs before the denoising loop, after the parts are built and placed
    on the run's device with its dtype (e.g. Layer-Animate t2v: the transparent image first).

    ``run`` takes the collated batch and returns it with what the stage made added.
    """

    name: str = "stage"

    def run(self, parts: Any, batch: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
            generator: torch.Generator | None = None, progress: bool = False) -> dict[str, Any]:
        raise NotImplementedError
