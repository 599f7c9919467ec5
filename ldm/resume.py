"""What a checkpoint must hold beyond weights and optimizer state for a resumed run to continue, not restart.

Lightning saves the model, optimizers, schedulers and loop counters. A run resumed from those alone replays the
random stream from its start (the noise, timesteps and caption dropout of step 0 again) and restarts the epoch's
data order. :class:`ResumeState` adds, under ``checkpoint["resume_state"]``:

* ``rng``: the torch (CPU and CUDA), numpy and Python ``random`` states of every rank, as tensors and numbers so the
  checkpoint still loads with ``torch.load(weights_only=True)``;
* ``data``: ``{"epoch", "offset"}``, the epoch and the number of its samples already trained (by all ranks
  together), for a :class:`ldm.data.sampler.ResumableRandomSampler`.

A checkpoint of ``N`` processes resumes on ``M``: weights, EMA, optimizer and schedule state are the same on every
rank and carry over; the data position carries over exactly (``offset`` counts samples of the one global order, so
the ``M`` ranks continue it); the random streams carry over only when ``M == N`` (else rank ``r`` continues rank 0's
stream reseeded by ``r``, so a resumed run is not bit-equal to one that never stopped). Shards
(:class:`ldm.data.shards.ShardDataset`) are streams: a resumed run starts their epoch again.

Modules with random state of their own (the caption-dropout RNG) save it in their ``on_save_checkpoint``.
With this, N steps straight and N/2 steps + kill + resume give the same weights (tested bit for bit on CPU).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.data.buckets import BucketBatchSampler
from ldm.data.sampler import ResumableRandomSampler

log = logging.getLogger(__name__)


def get_rng_state() -> dict[str, Any]:
    """Every global random state training draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_from_ranks(obj: Any, trainer: pl.Trainer) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (all ranks call it; one process: ``[obj]``)."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)  # between our own processes: no file is unpickled
    return gathered


class ResumeState(Callback):
    """Save and restore the random states and the data position (see the module docstring).

    Args:
        sampler: the training loader's :class:`ResumableRandomSampler` or :class:`BucketBatchSampler` (``None``: only
            the random states).
        batch_size: samples per training batch (converts trained batches to a sample offset).
    """

    def __init__(self, sampler: ResumableRandomSampler | BucketBatchSampler | None = None, batch_size: int = 1):
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self._loaded_data: dict | None = None

    @classmethod
    def for_loader(cls, loader: torch.utils.data.DataLoader | None) -> "ResumeState":
        batch_sampler = getattr(loader, "batch_sampler", None)
        if isinstance(batch_sampler, BucketBatchSampler):  # aspect-ratio buckets hold the position themselves
            return cls(batch_sampler, batch_sampler.batch_size)
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, ResumableRandomSampler):
            sampler = None
        return cls(sampler, getattr(loader, "batch_size", None) or 1)

    def _data_position(self, trainer: pl.Trainer) -> dict[str, int]:
        # `ready` counts this epoch's batches that reached training_step, the one being checkpointed included
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        epoch = trainer.current_epoch
        if done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        # samples of the one global order (every rank took batch_size of them per batch), so M processes can resume
        # what N wrote
        return {"epoch": int(epoch), "offset": int(done * self.batch_size * trainer.world_size)}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["resume_state"] = {"rng": gather_from_ranks(get_rng_state(), trainer), "world_size": trainer.world_size,
                                      "data": self._data_position(trainer)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("resume_state")
        if state is None:
            log.warning("this checkpoint has no random or data state (written by an older version): the resumed run "
                        "draws fresh noise and restarts its epoch")
            return
        rng = state["rng"]
        if len(rng) == trainer.world_size:
            set_rng_state(rng[trainer.global_rank])
        else:
            # a different process count cannot continue every stream: rank r continues rank 0's, offset by r
            set_rng_state(rng[0])
            if trainer.global_rank:
                torch.manual_seed(int(torch.randint(0, 2**62, ())) + trainer.global_rank)
            log.warning("resuming %d process(es) from a checkpoint of %d: random streams are reseeded per rank",
                        trainer.world_size, len(rng))
        if self.sampler is not None:
            data = state["data"]
            self.sampler.resume(data["epoch"], min(data["offset"], self.sampler.num_samples))
            self._loaded_data = dict(data)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume on another number of processes (or batch), restate Lightning's count of this epoch's batches
        in the new terms, ``offset / (batch x processes)``: its accumulation windows, epoch end and the next saved
        position all count from it."""
        data, self._loaded_data = self._loaded_data, None
        if data is None or data["epoch"] != trainer.current_epoch:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        per_batch = self.batch_size * trainer.world_size
        if progress.ready * per_batch != data["offset"]:
            done = data["offset"] // per_batch
            # as Lightning saved them: the checkpointed batch ready and processed but not yet counted completed
            progress.ready = progress.started = progress.processed = done
            progress.completed = max(0, done - 1)
