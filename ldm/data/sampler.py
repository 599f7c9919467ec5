"""A shuffling sampler whose position can be saved and restored, so a resumed run continues its epoch.

Epoch ``e`` visits ``randperm(n, seed + e)``: the order depends only on the seed and the epoch, not on any global
random state, and ``resume(epoch, offset)`` makes the next pass over that epoch start at sample ``offset``. Lightning
calls :meth:`set_epoch` at each epoch start; the training callback :class:`ldm.resume.ResumeState` saves and
restores the position from the number of batches trained.

With several training processes (:meth:`set_distributed`), rank ``r`` of ``w`` takes every ``w``-th sample of that
one global order, starting at ``offset + r``, cut to the same length on every rank. ``offset`` counts samples of the
global order, so a checkpoint written by ``N`` processes resumes on ``M`` at the same place in the epoch.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableEpochs:
    """What the resumable samplers share: the epoch, this process's share, and the position a resume starts from.

    A subclass has ``num_samples`` (the range of resume offsets, in samples of the global order), ``units`` (how
    many items its global order has: samples, or batches for a batch sampler) and ``unit_size`` (samples an item
    stands for), and iterates ``self.share(order)`` over its epoch's global order.
    """

    unit_size = 1

    def _start_epochs(self) -> None:
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        self._resume: tuple[int, int] | None = None

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Make this the sampler of process ``rank`` of ``world_size`` (called by the trainer once it knows)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} process(es)")
        if world_size > self.units:
            raise ValueError(f"{self.units} item(s) of the epoch cannot be split over {world_size} processes")
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        # The full epoch (this rank's share) even when resuming mid-way: Lightning counts the epoch's batches from
        # this and restores how many of them were done.
        return self.units // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, offset: int) -> None:
        """Make the next pass over ``epoch`` start after its first ``offset`` samples of the global order (at item
        ``offset // unit_size``; other epochs are unaffected)."""
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"resume offset {offset} is outside the epoch of {self.num_samples} samples")
        self._resume = (int(epoch), int(offset))

    def share(self, order: list) -> list:
        """This rank's part of the epoch's global ``order``: from the resume position on, every ``world_size``-th
        item from ``rank``, cut to the same count on every rank."""
        offset = 0
        if self._resume is not None:
            epoch, resume_offset = self._resume
            if epoch == self.epoch:
                offset = resume_offset
            self._resume = None
        skip = offset // self.unit_size
        count = (len(order) - skip) // self.world_size
        return order[skip + self.rank::self.world_size][:count]


class ResumableRandomSampler(ResumableEpochs, Sampler[int]):
    """Indices ``0..n-1`` in the order of ``torch.randperm(n, generator=seed + epoch)`` (``shuffle=False``: in order).

    Args:
        num_samples: the dataset's length ``n``.
        seed: base seed of the permutations.
        shuffle: permute (training) or keep the order.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._start_epochs()

    @property
    def units(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + int(epoch)))

    def __iter__(self) -> Iterator[int]:
        yield from self.share(self.order(self.epoch).tolist())
