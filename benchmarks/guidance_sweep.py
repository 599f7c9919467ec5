#!/usr/bin/env python
"""Guidance against diversity on the shipped demo model: prompt accuracy and FID/KID for several guidance settings.

    OMP_NUM_THREADS=1 python benchmarks/guidance_sweep.py [--n 64] [--n-real 256] [--steps 50] \
        [--out benchmarks/results/guidance-sweep-cpu.md]

Prompts are the captions of the first ``--n`` items of the shapes dataset's validation split (with and without
sizes and positions, one or two objects), one image each, seed ``--seed + k`` for caption k in every setting (the
same starting noise everywhere, so settings differ by guidance alone). Per setting:

* prompt accuracy: the shapes evaluator's verdict on each image against its caption (``score_prompt``), with its
  binomial standard error;
* FID and KID of the generated images against the dataset's own renders of ``--n-real`` validation items after the
  prompts' (the distribution the captions were drawn with; not the prompts' own items, whose true images would
  share their captions with the generated ones). Features: ``--feature-extractor`` (default: the demo
  autoencoder's pooled latents, ``ldm.eval.fid:demo_autoencoder_features``, a FALLBACK: the FID Inception weights
  are not on this machine; pass ``--inception-weights PATH`` for the standard network). Compare values between
  rows of one table only (same N, same features);
* UNet rows evaluated per image (2 per step with guidance, 1 per step outside a guidance interval) and seconds.

A first row scores ``--floor-sets`` sets of ``--n`` OTHER real renders (disjoint validation items after the reference
set) the same way, mean +- std over the sets: the FID and KID that sampling noise alone gives at this N (a perfect
model's expected values and their spread), and the evaluator's accuracy on true images.

The default settings: guidance 1 (no guidance), 3, 5, 5 with rescale 0.7, and 5 with guidance in the sigma band
(0.3, 5] only, then with each end of that band alone ((0, 5]: no guidance above sigma 5; (0.3, inf]: none at or
below 0.3). ``--settings`` takes others as ``scale[:rescale[:lo,hi]]``, e.g. ``5:0.7`` or ``5:0:0.3,5``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from ldm.assets import DEMO_CHECKPOINT  # noqa: E402
from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.eval.fid import build_feature_extractor, distribution_scores, extract_features  # noqa: E402
from ldm.eval.shapes_eval import score_prompt  # noqa: E402
from ldm.generate import generate  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.threads import add_threads_argument, configure_threads  # noqa: E402

DEFAULT_SETTINGS = ("1", "3", "5", "5:0.7", "5:0:0.3,5", "5:0:0,5", "5:0:0.3,inf")
DEFAULT_FEATURES = "ldm.eval.fid:demo_autoencoder_features"


def parse_setting(text: str) -> dict:
    """``scale[:rescale[:lo,hi]]`` -> ``{"guidance", "guidance_rescale", "guidance_interval"}``."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"--settings {text!r}: expected scale[:rescale[:lo,hi]], e.g. 5:0.7 or 5:0:0.3,5")
    try:
        setting = {"guidance": float(parts[0]), "guidance_rescale": float(parts[1]) if len(parts) > 1 else 0.0,
                   "guidance_interval": None}
        if len(parts) == 3:
            lo, hi = (float(v) for v in parts[2].split(","))
            setting["guidance_interval"] = [lo, hi]
    except ValueError:
        raise ValueError(f"--settings {text!r}: expected numbers as scale[:rescale[:lo,hi]]") from None
    return setting


def label(setting: dict) -> str:
    text = f"guidance {setting['guidance']:g}"
    if setting["guidance_rescale"]:
        text += f", rescale {setting['guidance_rescale']:g}"
    if setting["guidance_interval"] is not None:
        lo, hi = setting["guidance_interval"]
        text += f", sigma in ({lo:g}, {hi:g}]"
    return text


class RowCounter:
    """Counts the batch rows the UNet is called on (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += int(args[0].shape[0])


def run_setting(model, setting: dict, captions: list[str], seeds: list[int], args) -> tuple[torch.Tensor, dict]:
    spec = {"name": "ddim", "num_steps": args.steps, "eta": 0.0}
    if setting["guidance_rescale"]:
        spec["guidance_rescale"] = setting["guidance_rescale"]
    if setting["guidance_interval"] is not None:
        spec["guidance_interval"] = setting["guidance_interval"]
    sampler = model.build_sampler(spec)
    counter = RowCounter(model.unet)
    start = time.perf_counter()
    try:
        images = generate(model, captions, sampler, seeds, guidance_scale=setting["guidance"], height=64, width=64,
                          batch_size=args.batch_size, progress=False)
    finally:
        counter.handle.remove()
    seconds = time.perf_counter() - start
    guided = sampler.guided_steps if setting["guidance"] != 1.0 else 0
    return images, {"seconds": seconds, "unet_rows_per_image": counter.rows / len(captions), "guided_steps": guided}


def accuracy(captions: list[str], images: torch.Tensor) -> tuple[float, float]:
    """Share of images the shapes evaluator accepts for their caption, and its binomial standard error."""
    correct = [bool(score_prompt(caption, image)["correct"]) for caption, image in zip(captions, images)]
    p = sum(correct) / len(correct)
    return p, math.sqrt(p * (1 - p) / len(correct))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT)
    parser.add_argument("--n", type=int, default=64, help="generated images per setting (validation captions)")
    parser.add_argument("--n-real", type=int, default=256, help="real renders (validation items) for FID/KID")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the model's trailing spacing)")
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="scale[:rescale[:lo,hi]] each (sigma band lo, hi)")
    parser.add_argument("--feature-extractor", default=DEFAULT_FEATURES)
    parser.add_argument("--inception-weights", default=None, help="use the FID Inception network from this file")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--floor-sets", type=int, default=5, help="disjoint real sets of --n for the noise floor")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "guidance-sweep-cpu.md"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_sweep.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv))
    threads = configure_threads(args.threads)
    settings = [parse_setting(text) for text in args.settings]
    if args.n < 2 or args.n_real < 2:
        raise SystemExit("error: --n and --n-real must be >= 2 (FID needs two images a set)")

    extractor = build_feature_extractor(None if args.inception_weights else args.feature_extractor,
                                        args.inception_weights)
    description = getattr(extractor, "description", args.feature_extractor)
    floor_items = args.floor_sets * args.n
    # items 0..n-1 give the prompts; the reference and the floor sets are later, disjoint items, so that generated
    # and floor images are both compared with true images of OTHER captions drawn from the same distribution
    reference = range(args.n, args.n + args.n_real)
    data = ShapesDataset("validation", num_samples=reference.stop + floor_items)
    captions = [data.sample(k)[1] for k in range(args.n)]
    seeds = [args.seed + k for k in range(args.n)]
    real = torch.stack([data[k]["image"] for k in reference])
    real_features = extract_features(extractor, real)
    model = LatentDiffusion.from_checkpoint(args.ckpt).eval()

    # the floor: sets of N other true images (their own captions), scored exactly as the generated ones
    floor = []
    for first in range(reference.stop, reference.stop + floor_items, args.n):
        others = range(first, first + args.n)
        images = torch.stack([data[k]["image"] for k in others])
        share, _ = accuracy([data.sample(k)[1] for k in others], images)
        scores = distribution_scores(real_features, extract_features(extractor, images),
                                     kid_subsets=args.kid_subsets, seed=args.seed)
        floor.append((share, scores["fid"], scores["kid"]["mean"], scores["kid"]["subset_size"]))
    values = torch.tensor([f[:3] for f in floor], dtype=torch.float64)
    spread = values.std(dim=0) if len(floor) > 1 else torch.zeros(3, dtype=torch.float64)
    rows = [{"setting": f"real renders, {len(floor)} sets of {args.n} (validation items {reference.stop}.."
                        f"{reference.stop + floor_items - 1}), no model: mean +- std over the sets",
             "guidance": None, "guidance_rescale": None, "guidance_interval": None, "seconds": 0.0,
             "unet_rows_per_image": 0.0, "guided_steps": None, "accuracy": float(values[:, 0].mean()),
             "accuracy_se": float(spread[0]), "fid": float(values[:, 1].mean()), "fid_std": float(spread[1]),
             "kid": float(values[:, 2].mean()), "kid_std": float(spread[2]), "kid_subset_size": floor[0][3],
             "floor_sets": [{"accuracy": a, "fid": f, "kid": k} for a, f, k, _ in floor]}]
    for setting in settings:
        images, cost = run_setting(model, setting, captions, seeds, args)
        share, error = accuracy(captions, images)
        scores = distribution_scores(real_features, extract_features(extractor, images),
                                     kid_subsets=args.kid_subsets, seed=args.seed)
        row = {"setting": label(setting), **setting, **cost, "accuracy": share, "accuracy_se": error,
               "fid": scores["fid"], "kid": scores["kid"]["mean"], "kid_std": scores["kid"]["std"],
               "kid_subset_size": scores["kid"]["subset_size"]}
        rows.append(row)
        print(f"{row['setting']}: accuracy {100 * share:.1f}% (se {100 * error:.1f}), FID {row['fid']:.4g}, "
              f"KID {row['kid']:.4g}, {row['unet_rows_per_image']:.0f} UNet rows/image, {cost['seconds']:.0f} s",
              flush=True)

    lines = [
        "# Guidance against diversity: the shipped demo model on the CPU",
        "",
        f"Command: `{command}`",
        "",
        f"- model: `{os.path.relpath(args.ckpt, REPO) if args.ckpt.startswith(REPO) else args.ckpt}`, DDIM "
        f"{args.steps} steps (trailing, eta 0), fp32, {threads} thread(s), {platform.processor() or platform.machine()}",
        f"- prompts: the captions of validation items 0..{args.n - 1} of `ShapesDataset('validation')`, one image "
        f"each, seeds {args.seed}..{args.seed + args.n - 1} (the same in every row)",
        f"- accuracy: the shapes evaluator (`score_prompt`) on each image against its caption; +- one binomial "
        f"standard error",
        f"- first row: {args.floor_sets} disjoint sets of {args.n} OTHER true renders scored the same way (mean +- std "
        f"over the sets): what sampling noise alone gives at this N; a difference smaller than its std is not "
        f"resolved",
        f"- FID / KID: against the dataset's renders of validation items {reference.start}..{reference.stop - 1} "
        f"(not the prompts' own items); KID subsets of "
        f"{rows[0]['kid_subset_size']}, {args.kid_subsets} subsets, mean (x 1e3) +- std over the subsets (first "
        f"row: over the sets)",
        f"- features: **{description}**",
        "- UNet rows / image: network evaluations per image (2 per guided step: conditional + unconditional)",
        "",
        "| setting | guided steps | UNet rows / image | prompt accuracy | FID | KID x 1e3 | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        guided = "-" if row["guided_steps"] is None else f"{row['guided_steps']} / {args.steps}"
        fid = f"{row['fid']:.3f}" + (f" +- {row['fid_std']:.3f}" if "fid_std" in row else "")
        lines.append(
            f"| {row['setting']} | {guided} | {row['unet_rows_per_image']:.0f} | "
            f"{100 * row['accuracy']:.1f}% +- {100 * row['accuracy_se']:.1f} | {fid} | "
            f"{1e3 * row['kid']:.2f} +- {1e3 * row['kid_std']:.2f} | {row['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"command": command, "features": description, "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
