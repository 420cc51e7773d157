"""``layerkit train``: compose, build, fit with Lightning, export safetensors, write the record."""

from __future__ import annotations

import os
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
    RUN_DIR_ENV,
    check_output_dir,
    default_output_dir,
    is_child_process,
    list_files,
    write_record,
)

WEIGHTS_NAME = "weights.safetensors"


def build_trainer(cfg: DictConfig, output_dir: Path, extra_callbacks: Sequence[Any] = ()) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from layerkit.training.checkpoint import AtomicCheckpointIO

    tcfg = params(cfg.trainer)
    strategy = tcfg.pop("strategy", "auto")
    if isinstance(strategy, dict):  # {name: ..., **kwargs} -> a Lightning strategy object
        strategy = _strategy(strategy)
    every = int(cfg.train.get("checkpoint_every", 50))
    callbacks = [
        ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0,
                        every_n_train_steps=max(every, 1), save_on_train_epoch_end=False),
        TQDMProgressBar(refresh_rate=1),
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


def train(overrides: Sequence[str], *, registry: Registry | None = None, callbacks: Sequence[Any] = ()) -> Path:
    """Run one training job; returns the output directory."""
    import lightning as L

    from layerkit.pipeline import build_parts, load_trainable_state, weight_files
    from layerkit.training.data import LayerkitDataModule
    from layerkit.training.module import LayerkitModule

    registry = registry or get_registry()
    cfg = compose("train", overrides, registry)
    output_dir = Path(cfg.output_dir) if cfg.get("output_dir") else None
    if is_child_process():
        output_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        output_dir = output_dir or default_output_dir("train")
        check_output_dir(output_dir, overwrite=bool(cfg.overwrite), resumable=True)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = LayerkitDataModule(cfg, registry)
    datamodule.check()  # a bad dataset fails here, before any file is written
    parts = build_parts(cfg, registry, training=True)
    datamodule.prepares = [control.prepare for control in parts.controls.values()]
    datamodule.collate = parts.task.collate
    module = LayerkitModule(parts, to_plain(cfg))
    for path in weight_files(cfg.get("init_from")):  # earlier stages' weights, in order
        load_trainable_state(module, path, parts=parts, allow_pickle=bool(cfg.get("allow_pickle", False)))

    resume = _resume_path(cfg, output_dir)
    if not is_child_process():
        if cfg.overwrite and output_dir.exists() and resume is None:
            import shutil

            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_DIR_ENV] = str(output_dir.resolve())
    trainer = build_trainer(cfg, output_dir, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)

    if trainer.is_global_zero:
        config = to_plain(cfg)
        weights = save_weights(
            output_dir / WEIGHTS_NAME,
            module.ema_state_dict(),  # the EMA weights when train.ema_decay > 0: what sampling uses
            metadata={"layerkit_config": config, "global_step": trainer.global_step,
                      "ema_decay": module.ema_decay},
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
            },
        )
    return output_dir


def _resume_path(cfg: DictConfig, output_dir: Path) -> Path | None:
    resume = cfg.get("resume")
    if resume in (None, "auto"):
        last = output_dir / "checkpoints" / "last.ckpt"
        return last if last.is_file() and not cfg.overwrite else None
    if resume is False or str(resume).lower() in {"false", "no", "never"}:
        return None
    path = Path(str(resume))
    if not path.is_file():
        raise LayerkitError(f"resume checkpoint '{path}' does not exist.")
    return path


def _final_loss(trainer: Any) -> float | None:
    value = trainer.callback_metrics.get("train/loss")
    return float(value) if isinstance(value, torch.Tensor) else None
