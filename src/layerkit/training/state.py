"""Callbacks of every layerkit training run: the exact-resume state and a progress bar on stderr."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

KEY = "layerkit_resume"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss)}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(Callback):
    """Stores, in each checkpoint, every random-number state (torch, CUDA, numpy, python) and the
    data order's position (``training.data.ResumableSampler``), and puts them back right before
    the first training step after a resume: where the uninterrupted run stood after the step the
    checkpoint was written at. (Checkpoints are written at the end of a training batch, and the
    data a step sees never draws from the global random state, so nothing in between differs.)"""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    @staticmethod
    def _sampler(trainer: Any) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        return getattr(datamodule, "sampler", None)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"rng": _rng_state()}
        sampler = self._sampler(trainer)
        if sampler is not None:
            loop = trainer.fit_loop.epoch_loop.batch_progress.current
            batch_size = int(trainer.datamodule.cfg.train.batch_size)
            state["sampler"] = sampler.state_dict(consumed=int(loop.processed) * batch_size)
        checkpoint[KEY] = state

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(KEY)
        if not state:
            return
        sampler = self._sampler(trainer)
        if sampler is not None and "sampler" in state:
            sampler.load_state_dict(state["sampler"])
        self.pending = state["rng"]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.pending is not None:
            _set_rng_state(self.pending)
            self.pending = None


class StderrProgressBar(TQDMProgressBar):
    """Lightning's bar, on stderr (stdout carries only what a script may read: the output folder)."""

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.train_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)
