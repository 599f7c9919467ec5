"""Several training processes: who this process is before Lightning knows, the strategy, and per-rank seeds.

Lightning starts and joins the processes (its own launcher for ``--devices N``, or ``torchrun`` / SLURM's ``srun``
starting them); this module only answers what the training scripts must know earlier than the ``Trainer`` (which
process writes the run folder) and builds the strategy with the collective timeout, so that a rank that dies ends
the run with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import sys
from typing import Any, Iterator

import numpy as np
import torch

STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed")
RUN_DIR_ENV = "LDM_RUN_DIR"  # the run folder rank 0 chose, inherited by the processes Lightning starts


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not a whole number") from None
    return None


def launch_world_size() -> int:
    """Processes of this run as the launcher announced them (``WORLD_SIZE``, SLURM's ``SLURM_NTASKS``); 1 when this
    process was started alone (Lightning's own launcher sets ``WORLD_SIZE`` only in the processes it starts)."""
    return _int_env("WORLD_SIZE", "SLURM_NTASKS") or 1


def launch_rank(devices_per_node: int | str = 1) -> int:
    """The global rank of this process from its environment, before any process group exists.

    ``RANK`` (torchrun), else ``SLURM_PROCID`` inside a multi-task SLURM step, else Lightning's
    ``NODE_RANK * devices_per_node + LOCAL_RANK`` (a process its launcher started, or node k's first process).
    """
    rank = _int_env("RANK")
    if rank is not None:
        return rank
    if (_int_env("SLURM_NTASKS") or 1) > 1:
        return _int_env("SLURM_PROCID") or 0
    node, local = _int_env("NODE_RANK", "GROUP_RANK") or 0, _int_env("LOCAL_RANK") or 0
    per_node = devices_per_node if isinstance(devices_per_node, int) else max(1, torch.cuda.device_count())
    return node * per_node + local


def is_launch_rank_zero(devices_per_node: int | str = 1) -> bool:
    return launch_rank(devices_per_node) == 0


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"lightning.strategy: unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return name


def build_strategy(name: str, timeout_minutes: float | None, find_unused_parameters: bool = False) -> Any:
    """The Lightning strategy for ``name`` with its collective timeout. ``auto`` stays Lightning's choice (one
    process: no strategy at all); DeepSpeed is passed by name (it brings its own timeout settings)."""
    check_strategy(name)
    if name in ("auto", "deepspeed"):
        return name
    timeout = _dt.timedelta(minutes=float(timeout_minutes)) if timeout_minutes else None
    kwargs = {} if timeout is None else {"timeout": timeout}
    if name == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        return FSDPStrategy(**kwargs)
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen",
                       find_unused_parameters=find_unused_parameters, **kwargs)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s random streams: ``seed`` itself on rank 0 (a one-process run draws what it always
    drew), a different, fixed stream on every other rank so that ranks do not draw the same noise."""
    return int(seed) if rank == 0 else (int(seed) + 1_000_003 * int(rank)) % 2**63


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch, numpy and Python's ``random`` for ``rank`` (:func:`rank_seed`); rank 0 is left as it is."""
    if rank == 0:
        return
    value = rank_seed(seed, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def global_batch(per_device: int, world_size: int, accumulate: int) -> int:
    """Samples per optimizer step: per-device batch x processes (devices x nodes) x accumulated micro-batches."""
    return int(per_device) * int(world_size) * int(accumulate)


def scaled_learning_rate(base: float, per_device: int, world_size: int, accumulate: int, scale: bool) -> float:
    """The optimizer's learning rate: ``base`` as configured, or with ``scale`` CompVis' linear rule
    ``base * global_batch`` (their ``base_learning_rate * accumulate_grad_batches * ngpu * batch_size``)."""
    return float(base) * (global_batch(per_device, world_size, accumulate) if scale else 1)


@contextlib.contextmanager
def relaunchable(run_dir: str | os.PathLike) -> Iterator[None]:
    """While training: what Lightning's launcher needs to start ranks 1..N-1 as copies of this command.

    It re-runs ``sys.argv``: the ``ldm`` command shows ``ldm <command>`` as its program name, so the real first
    argument goes back for the duration. The run folder rank 0 chose (maybe a new timestamped one) is passed on in
    :data:`RUN_DIR_ENV`, so that every rank writes into the same folder.
    """
    from ldm import cli

    shown, saved_env = sys.argv[0], os.environ.get(RUN_DIR_ENV)
    if cli.ARGV0 is not None:
        sys.argv[0] = cli.ARGV0
    os.environ[RUN_DIR_ENV] = os.fspath(run_dir)
    try:
        yield
    finally:
        sys.argv[0] = shown
        if saved_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = saved_env


def inherited_run_dir() -> str | None:
    """The run folder of a process started by Lightning's launcher for rank > 0 (see :func:`relaunchable`)."""
    if (_int_env("LOCAL_RANK") or 0) > 0 or (_int_env("NODE_RANK") or 0) > 0:
        return os.environ.get(RUN_DIR_ENV)
    return None
