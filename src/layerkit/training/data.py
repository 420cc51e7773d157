"""The DataModule: a registered dataset, each sample passed through the controls' ``prepare``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from layerkit.config import params
from layerkit.errors import LayerkitError
from layerkit.registry import Registry


def default_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep everything else as a list (strings, metadata)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise LayerkitError(
                    f"samples in one batch disagree on the shape of '{key}': {sorted(shapes)}; "
                    "pad them to the layer capacity or use batch_size=1."
                )
            out[key] = torch.stack(values)
        elif all(isinstance(v, bool | int | float) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class PreparedDataset(Dataset):
    """Apply non-learned control preparation (``Control.prepare``) to each sample; with
    ``index`` each sample carries its dataset index as ``_index`` (for latent caching)."""

    def __init__(self, dataset: Dataset, prepares: list[Callable[[dict[str, Any]], dict[str, Any]]],
                 index: bool = False) -> None:
        self.dataset = dataset
        self.prepares = prepares
        self.index = index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        for prepare in self.prepares:
            sample = prepare(sample)
        if self.index:
            sample = {**sample, "_index": index}
        return sample


class ResumableSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), resumable mid-epoch: the checkpoint
    stores the epoch and how many items of it were consumed (``state_dict``), and the resumed run
    sees exactly the items the uninterrupted run would have seen. Each ``__iter__`` is one epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = int(size), int(seed)
        self.epoch = 0       # the epoch the next __iter__ yields
        self.skip = 0        # items of that epoch already consumed (set on resume)
        self.current = 0     # the epoch being yielded

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        self.current, self.epoch = self.epoch, self.epoch + 1
        yield from order[skip:]

    def state_dict(self, consumed: int) -> dict[str, int]:
        return {"epoch": self.current, "consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.skip = int(state["epoch"]), int(state["consumed"])
        if self.skip >= self.size:  # the epoch was complete
            self.epoch, self.skip = self.epoch + 1, 0


class LayerkitDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, registry: Registry, prepares: list[Callable] | None = None,
                 collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dataset = registry.build("dataset", cfg.data.name, **params(cfg.data))
        self.prepares = prepares or []
        self.collate = collate or default_collate
        self.cache = bool(cfg.train.get("cache_latents", False))
        if self.cache and not getattr(self.dataset, "cacheable", False):
            raise LayerkitError(
                f"train.cache_latents needs a dataset whose item i is the same every epoch; '{cfg.data.name}' "
                "does not say it is (set cacheable = True on a deterministic dataset)."
            )
        try:
            self.size = len(self.dataset)
        except TypeError:
            self.size = None
        seed = int(cfg.get("seed", 0))
        self.sampler = ResumableSampler(self.size, seed) if self.size else None
        self.generator = torch.Generator().manual_seed(seed)  # worker seeds: not from the global RNG

    def check(self) -> None:
        """Read one sample now so a broken dataset fails before a run directory exists."""
        if self.size == 0:
            raise LayerkitError(f"dataset '{self.cfg.data.name}' is empty.")
        _ = self.dataset[0]

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.train.get("num_workers", 0))
        return DataLoader(
            PreparedDataset(self.dataset, self.prepares, index=self.cache),
            batch_size=int(self.cfg.train.batch_size),
            shuffle=self.sampler is None,
            sampler=self.sampler,
            generator=self.generator,
            num_workers=workers,
            collate_fn=self.collate,
            drop_last=self.size is not None and self.size >= int(self.cfg.train.batch_size),
            persistent_workers=workers > 0,
        )
