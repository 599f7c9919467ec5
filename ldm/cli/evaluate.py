"""Prompt accuracy of a shapes text-to-image model, by category.

    python scripts/evaluate.py [--ckpt PATH] [--sampler ddim] [--steps 50] [--n-samples 1] [--json OUT]
    python scripts/evaluate.py --sweep [--sweep-steps 5 10 20 50 100] [--out-dir DIR]

Samples the fixed prompt set ``ldm.eval.shapes_eval.EVAL_PROMPTS`` (single object colour+shape, with
position, two objects, unseen colour-shape pairs), scores each image with the shapes evaluator (colour,
shape, size, position read off the pixels) and prints a markdown table of accuracies.

``--sweep`` runs every sampler at several step counts (and DDPM at all of the schedule's steps) and writes
a table and a plot of overall prompt accuracy against the number of network evaluations (one evaluation =
one batched conditional + unconditional UNet call).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time


import torch

from ldm.assets import DEMO_CHECKPOINT
from ldm.cli import run
from ldm.diffusion import SAMPLERS
from ldm.eval.shapes_eval import EVAL_PROMPTS, evaluate_images, format_table
from ldm.generate import autocast_for, generate
from ldm.images import save_grid
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.threads import add_threads_argument, configure_threads
from ldm.util import add_allow_target_argument

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
    parser.add_argument("--batch-size", type=int, default=49, help="97 prompts: two batches")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="UNet autocast (CPU: bf16)")
    parser.add_argument("--categories", nargs="*", default=None, help=f"subset of {list(EVAL_PROMPTS)}")
    parser.add_argument("--json", default=None, help="write per-category results (and per-item scores) here")
    parser.add_argument("--grid-dir", default=None, help="save a sample grid per category here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--task", default="txt2img", choices=["txt2img", "img2img", "inpaint"],
                        help="img2img: change one attribute in place; inpaint: replace one of two objects "
                             "(ldm/eval/editing_eval.py)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="img2img strengths")
    parser.add_argument("--count", type=int, default=32, help="img2img / inpaint: scenes to edit")
    parser.add_argument("--sweep", action="store_true", help="every sampler at --sweep-steps; table + plot")
    parser.add_argument("--sweep-steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--sweep-samplers", nargs="+", default=None, help="default: every registered sampler")
    parser.add_argument("--out-dir", default="outputs/sweep", help="where --sweep writes sweep.md/json/png")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
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
    precision: str = "fp32",
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
                      batch_size=batch_size, progress=progress, autocast=autocast_for("cpu", precision))
    results = evaluate_images([(c, p, image) for (c, p), image in zip(jobs, images)])
    by_category = {c: torch.stack([im for (cc, _), im in zip(jobs, images) if cc == c]) for c in categories}
    return results, by_category


def sweep(model: LatentDiffusion, args: argparse.Namespace) -> list[dict]:
    """Accuracy against network evaluations for every sampler and step count; writes md, json and png."""
    samplers = args.sweep_samplers or sorted(SAMPLERS)
    runs = [(name, steps) for name in samplers if name != "ddpm" for steps in args.sweep_steps]
    if "ddpm" in samplers:
        runs.append(("ddpm", model.schedule.num_timesteps))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for name, steps in runs:
        sampler = model.build_sampler(sampler_spec(name, steps, args.eta))
        start = time.perf_counter()
        results, _ = evaluate_model(model, sampler, args.guidance, args.n_samples, args.seed, args.batch_size,
                                    args.categories, progress=not args.no_progress, precision=args.precision)
        row = {"sampler": name, "steps": steps, "nfe": sampler.num_model_evaluations,
               "seconds": round(time.perf_counter() - start, 1), "overall": results["overall"]["accuracy"]}
        row.update({c: r["accuracy"] for c, r in results["per_category"].items()})
        rows.append(row)
        log.info("%s %d steps (%d NFE): overall %.3f", name, steps, row["nfe"], row["overall"])
        with open(os.path.join(args.out_dir, "sweep.json"), "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)  # after every row: an interrupted sweep keeps what it measured
    categories = [c for c in rows[0] if c not in ("sampler", "steps", "nfe", "seconds")]
    lines = ["| sampler | steps | NFE | " + " | ".join(categories) + " | seconds |",
             "|---|---:|---:|" + "---:|" * len(categories) + "---:|"]
    for row in rows:
        cells = " | ".join(f"{100 * row[c]:.1f}" for c in categories)
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {cells} | {row['seconds']} |")
    table = "\n".join(lines)
    print("\n" + table)
    settings = (f"{os.path.basename(args.ckpt)}, guidance {args.guidance:g}, {args.precision}, "
                f"{args.n_samples} sample(s) per prompt, seed {args.seed}")
    with open(os.path.join(args.out_dir, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write(f"Prompt accuracy (%) by sampler and steps ({settings})\n\n{table}\n")
    plot_sweep(rows, os.path.join(args.out_dir, "sweep.png"))
    return rows


def plot_sweep(rows: list[dict], path: str) -> None:
    """Overall accuracy (%) against network evaluations, one line per sampler, log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for name in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["nfe"], 100 * row["overall"]) for row in rows if row["sampler"] == name)
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations (log scale)")
    axis.set_ylabel("prompt accuracy, all categories (%)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluate_editing(model, args) -> dict:
    """``--task img2img|inpaint``: accuracy (and kept-region PSNR) on seeded edited scenes; prints a table."""
    from ldm.eval.editing_eval import img2img_cases, inpaint_cases, score_cases

    sampler = model.build_sampler(sampler_spec(args.sampler, args.steps, args.eta))
    cases = img2img_cases(args.count, args.seed) if args.task == "img2img" else inpaint_cases(args.count, args.seed)
    images = torch.stack([c.image for c in cases])
    prompts = [c.prompt for c in cases]
    seeds = [args.seed + k for k in range(len(cases))]
    runs = {}
    start = time.perf_counter()
    settings = [("strength", s) for s in args.strengths] if args.task == "img2img" else [("inpaint", None)]
    for label, strength in settings:
        kwargs = {"strength": strength} if args.task == "img2img" else {"masks": torch.stack([c.mask for c in cases])}
        with autocast_for("cpu", args.precision):
            outputs = generate(model, prompts, sampler, seeds, guidance_scale=args.guidance,
                               batch_size=args.batch_size, progress=not args.no_progress, init_images=images,
                               **kwargs)
        key = f"strength {strength}" if strength is not None else "inpaint"
        runs[key] = score_cases(cases, outputs)
        if args.grid_dir:
            save_grid(torch.cat([images[:8], outputs[:8]]), os.path.join(args.grid_dir, f"{args.task}-{key}.png"),
                      nrow=8)
    seconds = time.perf_counter() - start
    print(f"\n{args.task}: {len(cases)} scenes, {args.sampler} {args.steps} steps, guidance {args.guidance}, "
          f"{seconds:.0f} s\n")
    print("| setting | right | position kept | kept-region PSNR (median) | kept >= 30 dB |\n|---|---|---|---|---|")
    for key, result in runs.items():
        psnr = result.get("psnr_kept_median")
        share = result.get("psnr_kept_at_least_30db")
        print(f"| {key} | {100 * result['accuracy']:.1f}% | {100 * result['position_kept']:.1f}% | "
              f"{'-' if psnr is None else f'{psnr:.1f} dB'} | {'-' if share is None else f'{100 * share:.1f}%'} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "seconds": seconds, "runs": runs}, handle, indent=2, default=str)
    return {key: result["accuracy"] for key, result in runs.items()}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    if args.sampler not in SAMPLERS:
        raise SystemExit(f"error: unknown sampler {args.sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: checkpoint not found: {args.ckpt}")
    model = LatentDiffusion.from_checkpoint(args.ckpt).eval()
    if args.task != "txt2img":
        return evaluate_editing(model, args)
    if args.sweep:
        return {"sweep": sweep(model, args)}
    sampler = model.build_sampler(sampler_spec(args.sampler, args.steps, args.eta))
    start = time.perf_counter()
    results, images = evaluate_model(
        model, sampler, args.guidance, n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size,
        categories=args.categories, progress=not args.no_progress, precision=args.precision,
    )
    seconds = time.perf_counter() - start
    print(f"\n{args.sampler} {sampler.num_model_evaluations} network evaluations, guidance {args.guidance}, {args.precision}, "
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
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
