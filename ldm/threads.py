"""How many CPU threads torch uses: all idle cores, not all cores.

torch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each other: when another job
holds some of the cores, every parallel region waits on a thread that is not running, and work runs 10-30x slower
(one UNet forward on this 2-core machine under load: 12.9 s with 2 threads, 0.45 s with 1). So the default is the
number of cores minus the other processes running right now (at least 1; Linux's count of runnable tasks, sampled a
few times at start); on an idle machine that is every core, as before. The 1-minute load average would lag: right
after a finished job it still counts it, and it counts this process's own recent work.
``--threads N`` (or ``LDM_THREADS``) sets it outright. Commands print the choice at start.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def other_running_tasks(samples: int = 5, interval: float = 0.02) -> float:
    """Runnable tasks besides this one (``/proc/loadavg``'s running count minus 1), the median of a few samples;
    the 1-minute load average where that file does not exist."""
    counts = []
    for index in range(samples):
        try:
            with open("/proc/loadavg", encoding="utf-8") as handle:
                counts.append(int(handle.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):
                return 0.0
        if index + 1 < samples:
            time.sleep(interval)
    return float(statistics.median(counts))


def default_threads(cores: int | None = None, busy: float | None = None) -> int:
    """``cores - round(busy)``, at least 1: the cores other running tasks leave idle."""
    cores = available_cores() if cores is None else int(cores)
    busy = other_running_tasks() if busy is None else busy
    return max(1, min(cores, cores - int(round(max(0.0, busy)))))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``LDM_THREADS``, else :func:`default_threads`; logs it."""
    source = "--threads"
    if threads is None and os.environ.get("LDM_THREADS"):
        threads, source = int(os.environ["LDM_THREADS"]), "LDM_THREADS"
    if threads is None:
        threads, source = default_threads(), f"idle cores: {available_cores()} minus other running tasks"
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    log.info("using %d CPU thread(s) (%s)", threads, source)
    return int(threads)


class _ThreadsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if values < 1:
            parser.error(f"--threads must be >= 1, got {values}")
        setattr(namespace, self.dest, values)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, action=_ThreadsAction, metavar="N",
                        help="CPU threads for torch (default: the idle cores, i.e. cores minus other running tasks; "
                             "processes sharing few cores should split them)")
