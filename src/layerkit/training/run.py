"""``layerkit train``: compose, build, fit with Lightning, export safetensors, write the record.

A run owns its folder (a lock naming its pid and host); it resumes exactly: the checkpoint holds
the trainable weights, optimiser, schedule, EMA, every random-number state and the data order's
position, so a run killed and resumed ends with the weights of the uninterrupted run, bit for bit
(on the same machine and software; a dataset that draws from the global random state breaks
that; ``train.cache_latents`` caches the VAE posterior's mode and draws nothing, so a resumed run's
refilled cache changes no random number, its latents equal up to the float rounding of the batch
they were encoded in). A damaged ``last.ckpt``
falls back to ``previous.ckpt`` with a warning; every unusable checkpoint is one sentence."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from layerkit.config import compose, params, to_plain
from layerkit.errors import LayerkitError
from layerkit.io.weights import save_weights
from layerkit.registry import Registry, get_registry
from layerkit.runs import (
    RECORD_NAME,
    RUN_DIR_ENV,
    check_output_dir,
    default_output_dir,
    is_child_process,
    list_files,
    merge_metrics,
    only_traces,
    run_lock,
    set_aside,
    stash_metrics,
    write_record,
)

WEIGHTS_NAME = "weights.safetensors"


def build_trainer(cfg: DictConfig, output_dir: Path, extra_callbacks: Sequence[Any] = ()) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from layerkit.training.checkpoint import AtomicCheckpointIO
    from layerkit.training.state import ResumeState, StderrProgressBar

    tcfg = params(cfg.trainer)
    strategy = tcfg.pop("strategy", "auto")
    if isinstance(strategy, dict):  # {name: ..., **kwargs} -> a Lightning strategy object
        strategy = _strategy(strategy)
    every = int(cfg.train.get("checkpoint_every", 50))
    callbacks = [
        ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0,
                        every_n_train_steps=max(every, 1), save_on_train_epoch_end=False),
        StderrProgressBar(refresh_rate=1),
        ResumeState(),
        *extra_callbacks,
    ]
    return L.Trainer(
        default_root_dir=str(output_dir),
        strategy=strategy,
        callbacks=callbacks,
        logger=CSVLogger(str(output_dir), name="logs", version=""),
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **tcfg,
    )


def _strategy(spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    name = spec.pop("name")
    if name == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(**spec)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(**spec)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**spec)
    raise LayerkitError(f"unknown strategy '{name}'; use ddp, fsdp, deepspeed or a Lightning strategy name.")


def train(overrides: Sequence[str], *, registry: Registry | None = None, callbacks: Sequence[Any] = (),
          cfg: DictConfig | None = None) -> Path:
    """Run one training job; returns the output directory."""
    from layerkit.checks import check_config

    registry = registry or get_registry()
    if cfg is None:
        cfg = compose("train", overrides, registry)
        check_config("train", cfg)
    from layerkit.training.module import check_compile

    check_compile(cfg.get("train", {}).get("compile"))  # before any file: a bad value, or no C++ compiler
    output_dir = Path(cfg.output_dir) if cfg.get("output_dir") else None
    child = is_child_process()
    if child:
        output_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        output_dir = output_dir or default_output_dir("train")
        check_output_dir(output_dir, overwrite=bool(cfg.overwrite), resumable=True)
        finished = _finished(cfg, output_dir)
        if finished is not None:
            print(f"layerkit: output_dir '{output_dir}' holds a finished run (step {finished} of "
                  f"{cfg.trainer.max_steps}); nothing to do. Raise trainer.max_steps to train on from its last "
                  "checkpoint, or pass overwrite=true to train again.", file=sys.stderr)
            return output_dir
    if child:
        return _fit(cfg, registry, output_dir, callbacks)
    with run_lock(output_dir):
        return _fit(cfg, registry, output_dir, callbacks)


def _finished(cfg: DictConfig, output_dir: Path) -> int | None:
    """The step of a finished run in ``output_dir`` that this config would not continue, or None."""
    record = output_dir / RECORD_NAME
    if cfg.overwrite or not record.is_file() or not (output_dir / WEIGHTS_NAME).is_file():
        return None
    import json

    try:
        step = int(json.loads(record.read_text()).get("global_step") or 0)
    except (OSError, ValueError):
        return None
    return step if step >= int(cfg.trainer.max_steps) else None


def _fit(cfg: DictConfig, registry: Registry, output_dir: Path, callbacks: Sequence[Any]) -> Path:
    import lightning as L

    from layerkit.checks import apply_threads
    from layerkit.pipeline import build_parts, latent_norm_record, load_trainable_state, weight_files
    from layerkit.training.checkpoint import check_fits
    from layerkit.training.data import LayerkitDataModule
    from layerkit.training.module import LayerkitModule

    apply_threads(cfg.get("threads", "auto"))
    import warnings

    # wrong for layerkit's runs: the data order resumes (ResumeState), and the log is continued
    warnings.filterwarnings("ignore", message=r".*ended before the epoch ended and your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = LayerkitDataModule(cfg, registry)
    datamodule.check()  # a bad dataset fails here, before any file is written
    parts = build_parts(cfg, registry, training=True)
    datamodule.prepares = [control.prepare for control in parts.controls.values()]
    datamodule.collate = parts.task.collate
    module = LayerkitModule(parts, to_plain(cfg))
    for path in weight_files(cfg.get("init_from")):  # earlier stages' weights, in order
        load_trainable_state(module, path, parts=parts, allow_pickle=bool(cfg.get("allow_pickle", False)))

    resume, checkpoint = _resume_checkpoint(cfg, output_dir)
    if checkpoint is not None:
        check_fits(checkpoint, module, resume)
        del checkpoint
    child = is_child_process()
    if not child:
        if resume is None and cfg.overwrite:
            set_aside(output_dir)
        elif resume is None and output_dir.is_dir() and only_traces(output_dir) and any(
                p.name != ".layerkit.lock" for p in output_dir.iterdir()):
            print(f"layerkit: output_dir '{output_dir}' holds only an interrupted run's traces and no usable "
                  "checkpoint; starting the run afresh there.", file=sys.stderr)
        output_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(output_dir.resolve())
    parts_logs = stash_metrics(output_dir / "logs") if resume is not None and not child else []
    trainer = build_trainer(cfg, output_dir, callbacks)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into SystemExit(1) after its own teardown
            if not child:
                merge_metrics(output_dir / "logs", parts_logs)
            raise KeyboardInterrupt from None
        raise
    finally:
        if not child and trainer.is_global_zero and (output_dir / "logs" / "metrics.csv").is_file():
            merge_metrics(output_dir / "logs", parts_logs)
    if trainer.interrupted:
        raise KeyboardInterrupt

    if trainer.is_global_zero:
        config = to_plain(cfg)
        weights = save_weights(
            output_dir / WEIGHTS_NAME,
            module.ema_state_dict(),  # the EMA weights when train.ema_decay > 0: what sampling uses
            metadata={"layerkit_config": config, "global_step": trainer.global_step,
                      "ema_decay": module.ema_decay,
                      **({"layerkit_latent_norm": norm} if (norm := latent_norm_record(parts.task.latent_norm)) else {}),
                      **({"layerkit_latent_residual": dict(residual)}
                         if (residual := getattr(parts.task, "latent_residual", None)) else {})},
        )
        if module.ema is not None:  # exports carry the EMA weights too
            module.ema.copy_to([p for p in module.parameters() if p.requires_grad])
        exported = []
        for adapter in parts.adapters.values():
            if not adapter.trainable_parameters():
                continue  # frozen in this stage: its file came from an earlier one
            exported += adapter.export(parts.backbone, str(output_dir / "export"), cfg.export.formats)
        write_record(
            output_dir,
            command="train",
            config=config,
            seed=int(cfg.seed),
            files=list_files(output_dir),
            extra={
                "global_step": trainer.global_step,
                "resumed_from": str(resume) if resume else None,
                "weights": str(weights),
                "exported": exported,
                "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
                "world_size": trainer.world_size,
                "final_loss": _final_loss(trainer),
                **({"latent_cache": {"passes_encoded": cache.misses, "passes_cached": cache.hits}}
                   if (cache := module.latent_cache) is not None else {}),  # this process's (a resumed run's own)
            },
        )
    return output_dir


def _resume_checkpoint(cfg: DictConfig, output_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its contents: ``resume=PATH`` (one sentence if unusable),
    or with ``resume=auto`` the folder's ``last.ckpt``, falling back to ``previous.ckpt`` with a
    warning when the last one is damaged."""
    from layerkit.training.checkpoint import PREVIOUS_NAME, read_checkpoint

    resume = cfg.get("resume")
    if resume is False or str(resume).lower() in {"false", "no", "never"}:
        return None, None
    if resume not in (None, "auto"):
        path = Path(str(resume))
        return path, read_checkpoint(path)
    if cfg.overwrite:
        return None, None
    folder = output_dir / "checkpoints"
    candidates = [p for p in (folder / "last.ckpt", folder / PREVIOUS_NAME) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except LayerkitError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            print(f"layerkit: warning: {problem} Resuming from '{path}' (step {checkpoint['global_step']}).",
                  file=sys.stderr)
        return path, checkpoint
    if problems:
        raise LayerkitError(f"cannot resume: {' '.join(problems)} Pass resume=false to start over in this folder, "
                            "or overwrite=true to move it aside.")
    return None, None


def _final_loss(trainer: Any) -> float | None:
    value = trainer.callback_metrics.get("train/loss")
    return float(value) if isinstance(value, torch.Tensor) else None
