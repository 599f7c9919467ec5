"""Prompt accuracy of a shapes text-to-image model, by category.

    python scripts/evaluate.py [--ckpt PATH] [--sampler ddim] [--steps 50] [--n-samples 1] [--json OUT]

Samples the fixed prompt set ``ldm.eval.shapes_eval.EVAL_PROMPTS`` (single object colour+shape, with
position, two objects, unseen colour-shape pairs), scores each image with the shapes evaluator (colour,
shape, size, position read off the pixels) and prints a markdown table of accuracies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from ldm.assets import DEMO_CHECKPOINT  # noqa: E402
from ldm.diffusion import SAMPLERS  # noqa: E402
from ldm.eval.shapes_eval import EVAL_PROMPTS, evaluate_images, format_table  # noqa: E402
from ldm.generate import generate  # noqa: E402
from ldm.images import save_grid  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402

log = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT)
    parser.add_argument("--sampler", default="ddim", help=f"one of {sorted(SAMPLERS)}")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--n-samples", type=int, default=1, help="images per prompt (different seeds)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--categories", nargs="*", default=None, help=f"subset of {list(EVAL_PROMPTS)}")
    parser.add_argument("--json", default=None, help="write per-category results (and per-item scores) here")
    parser.add_argument("--grid-dir", default=None, help="save a sample grid per category here")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def sampler_spec(name: str, steps: int, eta: float) -> dict:
    spec = {"name": name}
    if name != "ddpm":
        spec["num_steps"] = steps
    if name == "ddim":
        spec["eta"] = eta
    return spec


def evaluate_model(
    model: LatentDiffusion,
    sampler,
    guidance: float,
    n_samples: int = 1,
    seed: int = 1000,
    batch_size: int = 32,
    categories=None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Sample every evaluation prompt ``n_samples`` times and score it; returns (results, images by category)."""
    categories = categories or list(EVAL_PROMPTS)
    unknown = sorted(set(categories) - set(EVAL_PROMPTS))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {list(EVAL_PROMPTS)}")
    jobs = [(c, p) for c in categories for p in EVAL_PROMPTS[c] for _ in range(n_samples)]
    seeds = [seed + k for k in range(len(jobs))]
    size = (model.config or {}).get("image_size", 64)
    images = generate(model, [p for _, p in jobs], sampler, seeds, guidance_scale=guidance, height=size, width=size,
                      batch_size=batch_size, progress=progress)
    results = evaluate_images([(c, p, image) for (c, p), image in zip(jobs, images)])
    by_category = {c: torch.stack([im for (cc, _), im in zip(jobs, images) if cc == c]) for c in categories}
    return results, by_category


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.sampler not in SAMPLERS:
        raise SystemExit(f"error: unknown sampler {args.sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: checkpoint not found: {args.ckpt}")
    model = LatentDiffusion.from_checkpoint(args.ckpt).eval()
    sampler = model.build_sampler(sampler_spec(args.sampler, args.steps, args.eta))
    start = time.perf_counter()
    results, images = evaluate_model(
        model, sampler, args.guidance, n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size,
        categories=args.categories, progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(f"\n{args.sampler} {sampler.num_model_evaluations} network evaluations, guidance {args.guidance}, "
          f"{args.n_samples} sample(s) per prompt, {seconds:.0f} s\n")
    print(format_table(results))
    accuracy = {c: row["accuracy"] for c, row in results["per_category"].items()}
    accuracy["overall"] = results["overall"]["accuracy"]
    if args.grid_dir:
        for category, grid in images.items():
            save_grid(grid, os.path.join(args.grid_dir, f"{category}.png"), nrow=8)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        items = [{k: v for k, v in item.items() if k in ("category", "prompt", "correct", "colour_ok", "shape_ok",
                                                          "size_ok", "position_ok", "count_ok")}
                 for item in results["items"]]
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "seconds": seconds, "per_category": results["per_category"],
                       "overall": results["overall"], "items": items}, handle, indent=2, default=str)
    return accuracy


if __name__ == "__main__":
    main()
