#!/usr/bin/env python
"""What the thread default costs and saves: one guided DDIM step of the demo model, idle and beside a busy job.

    python benchmarks/threads.py [--repeats 5]

For each condition (idle; beside a one-thread matmul loop in another process) the step is timed with torch's own
default (one thread per core) and with ``ldm.threads.default_threads()`` (cores minus other running tasks),
alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from ldm.assets import DEMO_CHECKPOINT  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.threads import available_cores, default_threads, other_running_tasks  # noqa: E402

BUSY = "import torch; torch.set_num_threads(1); a = torch.randn(1024, 1024)\nwhile True: a @ a"


def step_seconds(model, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([500, 500])
    context = model.encode_text(["a red circle", ""])
    times = []
    with torch.no_grad():
        model.model_fn(x, t, context)
        for _ in range(repeats):
            start = time.perf_counter()
            model.model_fn(x, t, context)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, repeats: int) -> dict:
    ours = default_threads()
    rows = {"other_running_tasks": other_running_tasks(), "default_threads": ours, "torch_threads": available_cores()}
    rounds = {available_cores(): [], ours: []}
    for _ in range(3):  # alternating
        for threads in list(rounds):
            rounds[threads].append(step_seconds(model, threads, repeats))
    rows["seconds"] = {str(k): statistics.median(v) for k, v in rounds.items()}
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()
    result = {"idle": measure(model, args.repeats)}
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(2)
        result["busy"] = measure(model, args.repeats)
    finally:
        busy.kill()
        busy.wait()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
