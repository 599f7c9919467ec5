#!/usr/bin/env python
"""Prompt accuracy against training minutes, read off a finished diffusion run's step checkpoints.

    python benchmarks/demo_curve.py --run runs/demo/diffusion --autoencoder runs/demo/autoencoder/autoencoder.safetensors \
        [--out docs/demo-curve] [--n-samples 1]

Each ``checkpoints/step<N>.ckpt`` is exported (EMA weights, ``ldm export``) and scored by ``ldm evaluate`` (DDIM 50,
guidance 5, the 97 evaluation prompts). Its training minute is the checkpoint file's modification time less the
session's start in ``launch.json`` (so it includes validation, image grids and checkpointing, as a user waits for
them). Writes ``<out>.json`` and, when matplotlib is installed, ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CATEGORIES = ("single", "position", "two_objects", "unseen_pairs")
TARGETS = {"single": 90.0, "position": 80.0, "two_objects": 60.0, "unseen_pairs": 60.0}


def step_checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run / "checkpoints").glob("step*.ckpt"):
        match = re.fullmatch(r"step(\d+)\.ckpt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def training_start(run: Path) -> float:
    """The first session's start (a POSIX time) from ``launch.json``."""
    sessions = json.loads((run / "launch.json").read_text(encoding="utf-8"))
    return dt.datetime.fromisoformat(sessions[0]["started"]).timestamp()


def curve(run: Path, autoencoder: str, n_samples: int = 1, threads: int | None = None) -> list[dict]:
    from ldm.cli import evaluate, export_diffusion

    start = training_start(run)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for step, ckpt in step_checkpoints(run):
            weights = os.path.join(tmp, f"step{step}.safetensors")
            export_diffusion.main(["--run", str(run), "--autoencoder", autoencoder, "--ckpt", str(ckpt),
                                   "--out", weights])
            extra = ["--threads", str(threads)] if threads else []
            accuracy = evaluate.main(["--ckpt", weights, "--n-samples", str(n_samples), "--no-progress", *extra])
            row = {"step": step, "minutes": round((ckpt.stat().st_mtime - start) / 60, 2)}
            row.update({key: round(100 * float(accuracy[key]), 1) for key in CATEGORIES if key in accuracy})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    minutes = [row["minutes"] for row in rows]
    for key in CATEGORIES:
        line, = ax.plot(minutes, [row.get(key, float("nan")) for row in rows], marker="o", label=key)
        ax.axhline(TARGETS[key], color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("minutes of diffusion training (2 CPU cores)")
    ax.set_ylabel("prompt accuracy, % (DDIM 50, guidance 5)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("make demo: accuracy against training time (dotted: targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--autoencoder", required=True)
    parser.add_argument("--out", default="docs/demo-curve")
    parser.add_argument("--n-samples", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    rows = curve(Path(args.run), args.autoencoder, args.n_samples, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if plot(rows, args.out + ".png"):
        print(f"wrote {args.out}.json and {args.out}.png")
    return rows


if __name__ == "__main__":
    main()
