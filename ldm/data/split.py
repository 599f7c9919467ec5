"""A held-out validation split of a dataset that has none of its own, fixed by a seed.

``HeldOutSplit(dataset, "validation", fraction=0.02, seed=0)`` and ``HeldOutSplit(dataset, "train", ...)`` see
disjoint parts whose union is the whole dataset: index ``i`` is held out when it is among the first
``round(fraction * n)`` (at least 1, and at least one left to train on) of ``randperm(n, seed)``. The same seed gives
the same split in every session and on every rank, so validation never sees a training image.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

PARTS = ("train", "validation")


def held_out_indices(num_samples: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)``, each sorted, for a dataset of ``num_samples`` items."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if num_samples < 2:
        raise ValueError(f"{num_samples} sample(s) cannot be split into training and validation")
    count = min(num_samples - 1, max(1, round(fraction * num_samples)))
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
    held = set(order[:count].tolist())
    return [i for i in range(num_samples) if i not in held], sorted(held)


class HeldOutSplit(Dataset):
    """One part (``train`` or ``validation``) of ``dataset`` (a dataset or its ``{target, params}`` node).

    Everything else (``skip_summary``, ``num_skipped``, captions...) is the inner dataset's; ``bucket_ids`` (aspect
    buckets) are those of this part's items.
    """

    def __init__(self, dataset: Any, part: str, fraction: float = 0.02, seed: int = 0):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if isinstance(dataset, Mapping):
            from ldm.util import instantiate_from_config

            dataset = instantiate_from_config(dataset, path="data.train")
        self.dataset = dataset
        self.part = part
        self.fraction = float(fraction)
        train, validation = held_out_indices(len(dataset), self.fraction, seed)
        self.indices = train if part == "train" else validation

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    @property
    def bucket_ids(self) -> list[int]:
        return [self.dataset.bucket_ids[i] for i in self.indices]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices", "part", "fraction"):  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.dataset, name)
