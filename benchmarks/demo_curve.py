#!/usr/bin/env python
"""Prompt accuracy against training minutes, read off a finished diffusion run's step checkpoints.

    python benchmarks/demo_curve.py --run runs/demo/diffusion --autoencoder runs/demo/autoencoder/autoencoder.safetensors \
        [--out docs/demo-curve] [--n-samples 1] [--weights ema,raw]

Each ``checkpoints/step<N>.ckpt`` is exported (EMA weights, ``ldm export``; ``--weights ema,raw`` scores the raw
weights too, a row each) and scored by ``ldm evaluate`` (DDIM 50,
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


def curve(run: Path, autoencoder: str, n_samples: int = 1, threads: int | None = None,
          weights: tuple[str, ...] = ("ema",)) -> list[dict]:
    from ldm.cli import evaluate, export_diffusion

    start = training_start(run)
    extra = ["--threads", str(threads)] if threads else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for step, ckpt in step_checkpoints(run):
            for kind in weights:
                path = os.path.join(tmp, f"step{step}-{kind}.safetensors")
                export_diffusion.main(["--run", str(run), "--autoencoder", autoencoder, "--ckpt", str(ckpt),
                                       "--out", path, "--weights", kind])
                accuracy = evaluate.main(["--ckpt", path, "--n-samples", str(n_samples), "--no-progress", *extra])
                row = {"step": step, "minutes": round((ckpt.stat().st_mtime - start) / 60, 2)}
                if len(weights) > 1:
                    row["weights"] = kind
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
    kinds = list(dict.fromkeys(row.get("weights", "ema") for row in rows))
    for key in CATEGORIES:
        colour = None
        for kind in kinds:  # EMA solid, raw dashed
            picked = [row for row in rows if row.get("weights", "ema") == kind]
            label = key if len(kinds) == 1 else f"{key} ({kind})"
            line, = ax.plot([row["minutes"] for row in picked], [row.get(key, float("nan")) for row in picked],
                            marker="o", label=label, color=colour, linestyle="-" if kind == "ema" else "--")
            colour = line.get_color()
        ax.axhline(TARGETS[key], color=colour, linestyle=":", linewidth=0.8)
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
    parser.add_argument("--weights", default="ema", help="comma-separated: ema, raw (each scored per checkpoint)")
    args = parser.parse_args(argv)
    weights = tuple(w.strip() for w in args.weights.split(",") if w.strip())
    if not weights or set(weights) - {"ema", "raw"}:
        parser.error(f"--weights takes ema and/or raw, got {args.weights!r}")
    rows = curve(Path(args.run), args.autoencoder, args.n_samples, args.threads, weights)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if plot(rows, args.out + ".png"):
        print(f"wrote {args.out}.json and {args.out}.png")
    return rows


if __name__ == "__main__":
    main()
