"""One LightningModule for every family: backbone + controls + adapters + task.

The loss is the backbone's own diffusion objective (epsilon, v or sample prediction) on the
generated frames only: frames the backbone re-imposes as given are never noised and never
enter the loss. Options the toys and real runs share: an EMA of the trainable weights (saved,
resumed, written to ``weights.safetensors`` for sampling), and caches of latents and text
embeddings for frozen encoders (``train.cache_latents``, ``train.cache_text``), a weighting
of the loss over timesteps (``train.loss_weighting``, see :func:`timestep_weights`), and
``torch.compile`` of the denoiser (``train.compile``; docs/benchmarks.md has what it buys).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.pipeline import (
    Parts,
    add_control_inputs,
    encode_packed,
    frame_mask,
    make_step,
    predict,
    reimposed,
    trainable_names,
)
from layerkit.training.cache import LatentCache, cache_prompt_embeddings
from layerkit.training.weighting import (
    LOSS_WEIGHTINGS,
    check_segment_names,
    prediction_target,
    region_weights,
    segment_frame_weights,
    segment_loss_weights,
    timestep_weights,
)

_OFF = ("false", "0", "no", "off", "none", "null", "")
_ON = ("true", "1", "yes", "on")


def _compile_backend(value: Any) -> str | None:
    """``train.compile``: off (false, 0, no, null), on (true, 1, yes: torch.compile's inductor) or
    a torch.compile backend name (any case)."""
    name = str(value).strip().lower() if value is not None else ""
    if value is False or name in _OFF:
        return None
    if value is True or name in _ON:
        return "inductor"
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):  # the message names the usual ones
        raise LayerkitError(f"train.compile is '{value}'; expected true, false or a torch.compile backend: "
                            f"{', '.join(torch._dynamo.list_backends())}.")
    return name


def _check_compiler(backend: str | None) -> None:
    """Inductor builds C++ (CPU) or Triton launchers (CUDA) with the system compiler: without one,
    one sentence before the first step rather than a traceback inside it."""
    if backend != "inductor":
        return
    import os
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "", "g++", "c++", "clang++") if c):
        raise LayerkitError("train.compile=true builds the denoiser with torch.compile's inductor, which needs a "
                            "C++ compiler (g++ or clang++, or $CXX) on this machine; install one or set "
                            "train.compile=false.")


def check_compile(value: Any) -> None:
    """``train.compile`` as ``layerkit train`` checks it before writing anything."""
    _check_compiler(_compile_backend(value))


class LayerkitModule(L.LightningModule):
    def __init__(self, parts: Parts, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = parts.backbone
        self.controls = nn.ModuleDict(parts.controls)
        self.adapters = nn.ModuleDict(parts.adapters)
        self.task = parts.task
        self.config = config
        self.scheduler = parts.backbone.make_scheduler("train")
        self.strict_loading = False  # checkpoints hold trainable weights only
        train = config.get("train", {})
        self.prompt_dropout = float(train.get("prompt_dropout", 0.0))
        self.dropout_per_block = bool(train.get("prompt_dropout_per_block", False))
        self.ema_decay = float(train.get("ema_decay", 0.0) or 0.0)
        if not 0.0 <= self.ema_decay < 1.0:
            raise LayerkitError(f"train.ema_decay must lie in [0, 1); got {self.ema_decay}.")
        self.ema: Any = None
        self.loss_weighting = str(train.get("loss_weighting", "none") or "none")
        self.snr_gamma = float(train.get("snr_gamma", 5.0))
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise LayerkitError(f"train.loss_weighting is '{self.loss_weighting}'; expected one of: "
                                f"{', '.join(LOSS_WEIGHTINGS)}.")
        if self.loss_weighting == "min_snr" and not self.snr_gamma > 0:
            raise LayerkitError(f"train.snr_gamma must be above 0; got {self.snr_gamma}.")
        if (self.loss_weighting != "none" and self.scheduler.config.prediction_type == "epsilon"
                and float(self.scheduler.alphas_cumprod.min()) <= 0.0):
            raise LayerkitError(f"train.loss_weighting={self.loss_weighting} cannot weigh the last step of a zero-"
                                "terminal-SNR schedule for an epsilon model (its x0 error counts 0 there); use "
                                "v prediction or loss_weighting=none.")
        self.segment_weights = segment_loss_weights(train.get("segment_loss_weights"))
        if self.segment_weights and self.task.segment_names:  # a typo: one sentence now, not at some step
            check_segment_names(self.segment_weights, self.task.segment_names)
        self.region_weight = float(train.get("region_loss_weight", 0.0) or 0.0)
        if self.region_weight < 0:
            raise LayerkitError(f"train.region_loss_weight must be at least 0; got {self.region_weight}.")
        if self.region_weight > 0 and not self.task.marks_loss_region:
            raise LayerkitError(f"train.region_loss_weight is {self.region_weight}, but task '{self.task.name}' marks no "
                                "loss region (Packed.loss_region) to weigh; set it to 0.")
        self.given_latents = str(train.get("given_latents", "sampled"))
        self.latent_cache = LatentCache(self.given_latents) if train.get("cache_latents") else None
        if train.get("cache_text"):
            cache_prompt_embeddings(self.backbone)
        self.compile_backend = _compile_backend(train.get("compile", False))

    @property
    def parts(self) -> Parts:
        return Parts(self.backbone, self.task, dict(self.controls), dict(self.adapters))

    # -- the objective ---------------------------------------------------------------------
    def encode(self, packed: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Latents of the packed clip (from the cache where a sample's are there)."""
        if self.latent_cache is not None:
            return self.latent_cache.encode(self.backbone, packed, batch)
        with torch.no_grad():
            return encode_packed(self.backbone, packed, training=True, given_latents=self.given_latents)

    def diffusion_loss(self, batch: dict[str, Any], *, timesteps: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The masked diffusion loss of one batch. ``timesteps`` [B] and ``noise`` (latent-shaped)
        fix what is otherwise drawn (diagnostics compare losses at a chosen t)."""
        packed = add_control_inputs(self.task.pack(batch, training=True), batch, dict(self.controls))
        latents, layout = self.encode(packed, batch)
        b = latents.shape[0]
        drop = None
        if self.prompt_dropout > 0:  # for classifier-free guidance at sampling: whole samples or each block
            shape = (b, len(packed.prompts[0])) if self.dropout_per_block else (b,)
            drop = torch.rand(shape, generator=generator) < self.prompt_dropout
        cond = self.backbone.encode_conditions(packed, latents=latents, drop=drop)  # a frozen encoder records no graph
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device) \
                if generator is not None else torch.randn_like(latents)
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        keep = frame_mask(reimposed(self.backbone, layout), latents)
        noisy = torch.where(keep, latents, noisy)
        output = predict(self.parts, packed, make_step(packed, noisy, timesteps, cond))
        target = prediction_target(self.scheduler, latents, noise, timesteps)
        weight = (~keep).to(output.dtype).expand_as(output)
        denom = weight.sum().clamp_min(1.0)
        if self.loss_weighting != "none":  # per-sample factors; the mean keeps the frame count's scale
            factor = timestep_weights(self.scheduler, timesteps, self.loss_weighting, self.snr_gamma)
            weight = weight.float() * factor.view(-1, *([1] * (weight.dim() - 1)))
        if self.segment_weights:  # per latent frame, from the segment it belongs to
            per_frame = segment_frame_weights(self.segment_weights, packed, layout,
                                              self.task.segment_names).to(weight.device)
            weight = weight.float() * per_frame.view(1, 1, -1, *([1] * (weight.dim() - 3)))
        if self.region_weight > 0:  # per latent element, from the task's loss region (e.g. a sprite's matte)
            if packed.loss_region is None:
                raise LayerkitError(f"train.region_loss_weight is {self.region_weight}, but this training batch of "
                                    f"task '{self.task.name}' has no loss region (e.g. no foreground matte); set it to 0.")
            factor = region_weights(packed.loss_region.to(weight.device), layout.windows, tuple(output.shape),
                                    self.region_weight)
            weight = weight.float() * factor
        return (F.mse_loss(output.float(), target.float(), reduction="none") * weight).sum() / denom

    def on_train_start(self) -> None:
        """Trainable parts in train mode, fully frozen parts (VAE, text encoder) in eval mode."""
        self._align_lr_with_resumed_run()
        if self.compile_backend and getattr(self.backbone.denoiser, "_compiled_call_impl", None) is None:
            _check_compiler(self.compile_backend)
            # in place (nn.Module.compile): the weights keep their names in checkpoints and exports;
            # static shapes: one graph per packed length (e.g. LayerFlow's 8 and 9 latent frames)
            self.backbone.denoiser.compile(backend=self.compile_backend, dynamic=False)
        self.train()
        for module in self.backbone.children():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch.get("prompt", [0])))
        return loss

    # -- EMA of the trainable weights ------------------------------------------------------
    def _ema(self) -> Any:
        if self.ema_decay <= 0:
            return None
        if self.ema is None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel([p for p in self.parameters() if p.requires_grad], decay=self.ema_decay)
        return self.ema

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then the EMA's: once per optimiser step (not per accumulated
        micro-batch), and before any callback's ``on_train_batch_end`` (so a checkpoint written
        there holds the EMA of the same step as the weights: resume is exact)."""
        super().optimizer_step(*args, **kwargs)
        ema = self._ema()
        if ema is not None:
            ema.to(device=self.device)
            ema.step([p for p in self.parameters() if p.requires_grad])

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights with the EMA values in place of the trained ones (or the trained
        ones when no EMA runs)."""
        state = self.trainable_state_dict()
        ema = self._ema()
        if ema is None:
            return state
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        for name, shadow in zip(names, ema.shadow_params, strict=True):
            state[name] = shadow.detach().to(state[name].dtype).cpu()
        return state

    # -- optimiser -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optim = self.config.get("optim", {})
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise LayerkitError("nothing to train: set 'trainable' patterns or add an adapter or control with weights.")
        optimizer = torch.optim.AdamW(
            trainable,
            lr=float(optim.get("lr", 1e-4)),
            weight_decay=float(optim.get("weight_decay", 0.0)),
            betas=tuple(optim.get("betas", (0.9, 0.999))),
            eps=float(optim.get("eps", 1e-8)),
        )
        name = str(optim.get("scheduler", "constant") or "constant")
        warmup = int(optim.get("warmup_steps", 0) or 0)
        ratio = float(optim.get("warmup_ratio", 0.0) or 0.0)
        steps = int((self.trainer.max_steps if self._trainer is not None else None)
                    or self.config.get("trainer", {}).get("max_steps") or 0)
        if ratio and steps > 0:
            warmup = warmup or round(ratio * steps)
        if name == "constant" and warmup == 0:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self._lr_schedule(optimizer, name, warmup), "interval": "step"}}

    def _lr_schedule(self, optimizer: torch.optim.Optimizer, name: str, warmup: int) -> Any:
        """diffusers' schedules (``diffusers.optimization``) over the run's optimiser steps
        (``trainer.max_steps``, or what ``trainer.max_epochs`` comes to)."""
        from diffusers.optimization import SchedulerType, get_scheduler

        names = [s.value for s in SchedulerType if s.value != "piecewise_constant"]  # needs step rules
        if name not in names:
            raise LayerkitError(f"optim.scheduler is '{name}'; expected one of: {', '.join(names)}.")
        total = -1
        if self._trainer is not None:
            total = int(self.trainer.max_steps or -1)
            if total <= 0:
                try:
                    estimate = self.trainer.estimated_stepping_batches
                    total = int(estimate) if math.isfinite(estimate) else -1
                except Exception:  # no data attached yet (a module used outside fit)
                    total = -1
        if total <= 0:  # no trainer attached (a module built outside a fit): the configured length
            total = int(self.config.get("trainer", {}).get("max_steps") or -1)
        if total <= 0 and name not in ("constant", "constant_with_warmup"):
            raise LayerkitError(
                f"optim.scheduler={name} decays over the run's length; set trainer.max_steps or trainer.max_epochs."
            )
        if name == "constant" and warmup:
            name = "constant_with_warmup"
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))

    def _align_lr_with_resumed_run(self) -> None:
        """A run resumed from a checkpoint written without this schedule starts it at the step the
        run has reached, not at step 0 (Lightning restores no state for a scheduler it never saved);
        one resumed without a schedule runs at ``optim.lr``, not at the last scheduled rate."""
        if self._trainer is None:  # used outside a fit: nothing was resumed
            return
        schedule = self.lr_schedulers()
        if schedule is None:  # constant: the configured rate, even over a resumed scheduled run's last one
            lr = float(self.config.get("optim", {}).get("lr", 1e-4))
            optimizers = self.optimizers(use_pl_optimizer=False)
            for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            return
        if isinstance(schedule, list):
            return
        step = int(self.trainer.global_step)
        if step > 0 and schedule.last_epoch < step:
            import warnings

            schedule.last_epoch = step - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "step() before optimizer.step()": intended here
                schedule.step()

    # -- checkpoints hold the trainable weights, never the frozen base -----------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = set(trainable_names(self))
        state = self.state_dict()
        extra = {k for k in state if k.startswith(("controls.", "adapters."))}  # their buffers too
        return {k: v for k, v in state.items() if k in names or k in extra}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["layerkit_config"] = self.config
        ema = self._ema()
        if ema is not None:
            checkpoint["layerkit_ema"] = {k: ([t.detach().cpu() for t in v] if k == "shadow_params" else v)
                                          for k, v in ema.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        unknown = [k for k in checkpoint["state_dict"] if k not in own]
        if unknown:
            raise LayerkitError(
                f"the checkpoint holds {len(unknown)} weights this model does not have (first: {unknown[0]})."
            )
        state = checkpoint.get("layerkit_ema")
        ema = self._ema()
        if ema is not None and state is not None:
            ema.load_state_dict(state)
