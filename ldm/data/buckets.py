"""Aspect-ratio buckets: train on pictures at (about) their own shape instead of a square crop of each.

Following kohya's ``--enable_bucket`` (sd-scripts ``make_bucket_resolutions``): :func:`make_buckets` lists
``(width, height)`` shapes whose sides are multiples of ``step`` and whose area is at most ``resolution ** 2``, from
tall portrait through the square to wide landscape; :func:`assign_bucket` gives an image the bucket of the nearest
aspect ratio; the dataset scales the image to cover its bucket and crops the rest
(:func:`ldm.data.image_folder.resize_and_crop`). Every batch must come from one bucket so that its images stack:
:class:`BucketBatchSampler` makes such batches, in an order that depends only on ``(seed, epoch)``, resumable
mid-epoch and split over several processes like :class:`ldm.data.sampler.ResumableRandomSampler`.

A sampler position is a count of *samples* of the global (all processes) batch order, as for
``ResumableRandomSampler``: ``resume(epoch, offset)`` skips the first ``offset // batch_size`` batches of that order.
The training callback writes ``offset = batches_done_per_process * batch_size * world_size``, so the conversion is
exact whatever the process count when the batch is resumed (with ``drop_last=False`` a bucket's last, partial
batch counts as a full one).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from ldm.data.sampler import ResumableEpochs


def _positive_int(value, name: str) -> int:
    try:
        valid = not isinstance(value, bool) and int(value) == value and value >= 1
    except (TypeError, ValueError):  # a string or None from a config
        valid = False
    if not valid:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def make_buckets(resolution: int, step: int = 64, min_size: Optional[int] = None,
                 max_size: Optional[int] = None) -> list[tuple[int, int]]:
    """``(width, height)`` buckets of at most ``resolution ** 2`` pixels, sorted from portrait to landscape.

    Sides are multiples of ``step`` within ``[min_size, max_size]`` (defaults, kohya's at 512: half and twice
    ``resolution``, rounded to ``step``). For each width the tallest height within the area is taken, and its
    transpose, so the set is symmetric; the square ``(s, s)`` with ``s = resolution`` rounded down to ``step`` is
    always included. ``step=64`` keeps every side a multiple of 8 in an f8 autoencoder's latents and of the UNet's
    downsampling.
    """
    resolution = _positive_int(resolution, "bucket resolution")
    step = _positive_int(step, "bucket step")
    if step > resolution:
        raise ValueError(f"bucket step {step} is larger than the resolution {resolution}: no bucket fits")
    side = resolution // step * step
    if min_size is None:
        min_size = max(step, math.ceil(resolution / 2 / step) * step)
    if max_size is None:
        max_size = 2 * resolution // step * step
    min_size = _positive_int(min_size, "min bucket size")
    max_size = _positive_int(max_size, "max bucket size")
    for name, value in (("min bucket size", min_size), ("max bucket size", max_size)):
        if value % step:
            raise ValueError(f"{name} {value} is not a multiple of the bucket step {step}")
    if not min_size <= side <= max_size:
        raise ValueError(f"bucket sizes must span the square bucket: min {min_size} <= {side} <= max {max_size} "
                         f"(resolution {resolution}, step {step})")
    area = resolution * resolution
    buckets = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, area // width // step * step)
        if height >= min_size:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height``'s, on a log scale (so 2:1 and 1:2
    are as far from the square); a tie goes to the earlier bucket."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    target = math.log(width / height)
    errors = [abs(math.log(w / h) - target) for w, h in buckets]
    return min(range(len(buckets)), key=errors.__getitem__)


class _EpochForwarder:
    """``BucketBatchSampler.sampler``: Lightning calls ``set_epoch`` on ``loader.sampler`` (which, for a loader with a
    ``batch_sampler``, is a plain ``SequentialSampler``) and on ``loader.batch_sampler.sampler``, never on the batch
    sampler itself; this is where that call arrives."""

    def __init__(self, owner: "BucketBatchSampler"):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class BucketBatchSampler(ResumableEpochs, Sampler[list[int]]):
    """Batches of dataset indices, each from a single bucket.

    Epoch ``e`` (generator seeded with ``seed + e``, as ``ResumableRandomSampler``): each bucket's indices are
    permuted and cut into batches of ``batch_size`` (the partial last one dropped when ``drop_last``), then the
    batches of all buckets are permuted together. ``shuffle=False``: buckets in id order, indices in order.

    With :meth:`set_distributed`, rank ``r`` of ``w`` takes every ``w``-th batch of that one global order, cut to
    the same count on every rank; ``len()`` is that count for a full epoch.

    Args:
        bucket_ids: the bucket of each dataset index (``CaptionedImageFolder.bucket_ids``).
        batch_size: indices per batch.
        seed: base seed of the epoch orders.
        shuffle: permute (training) or keep the order.
        drop_last: drop each bucket's partial batch, so every batch is full (training).
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        ids = [int(b) for b in bucket_ids]
        if not ids:
            raise ValueError("bucket_ids is empty: no samples to batch")
        groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(ids):
            groups.setdefault(bucket, []).append(index)
        self.members: list[list[int]] = [groups[b] for b in sorted(groups)]
        count = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        self.num_batches = sum(count(len(m)) for m in self.members)
        if self.num_batches == 0:
            largest = max(len(m) for m in self.members)
            raise ValueError(f"no bucket holds a full batch of {self.batch_size} (the largest holds {largest} of "
                             f"{len(ids)} samples in {len(self.members)} buckets): lower the batch size")
        self._start_epochs()
        self.sampler = _EpochForwarder(self)

    @property
    def units(self) -> int:
        return self.num_batches

    @property
    def unit_size(self) -> int:
        return self.batch_size

    @property
    def num_samples(self) -> int:
        """Samples in one epoch of the global batch order, the range of :meth:`resume` offsets (a partial batch,
        with ``drop_last=False``, counts as full). Named as ``ResumableRandomSampler.num_samples``, which
        ``ResumeState`` clamps offsets to."""
        return self.num_batches * self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        """The global batch order of ``epoch`` (every rank's batches, before the split)."""
        generator = torch.Generator().manual_seed(self.seed + int(epoch))
        batches: list[list[int]] = []
        for members in self.members:
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            stop = len(members) - len(members) % self.batch_size if self.drop_last else len(members)
            batches.extend(members[start:start + self.batch_size] for start in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.share(self.batches(self.epoch))
