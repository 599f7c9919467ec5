"""Prompt accuracy of a shapes text-to-image model, by category.

    python scripts/evaluate.py [--ckpt PATH] [--sampler ddim] [--steps 50] [--n-samples 1] [--json OUT]
    python scripts/evaluate.py --sweep [--sweep-steps 5 10 20 50 100] [--out-dir DIR]
    python scripts/evaluate.py --fid REAL_DIR --inception-weights pt_inception-2015-12-05-6726825d.pth [--metrics fid,kid]

Samples the fixed prompt set ``ldm.eval.shapes_eval.EVAL_PROMPTS`` (single object colour+shape, with
position, two objects, unseen colour-shape pairs), scores each image with the shapes evaluator (colour,
shape, size, position read off the pixels) and prints a markdown table of accuracies.

``--sweep`` runs every sampler at several step counts (and DDPM at all of the schedule's steps) and writes
a table and a plot of overall prompt accuracy against the number of network evaluations (one evaluation =
one batched conditional + unconditional UNet call).

``--fid REAL_DIR`` adds FID and KID between the generated images and the images under ``REAL_DIR``
(``ldm/eval/fid.py``): features of the FID Inception network read from a local file (``--inception-weights`` or
``LDM_INCEPTION_WEIGHTS``; nothing is downloaded), or of ``--feature-extractor module.path:callable``.
``--metrics fid`` or ``--metrics kid`` picks one of the two.
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
from ldm.cli.txt2img import add_guidance_option_arguments, guidance_settings
from ldm.diffusion import SAMPLERS
from ldm.eval.fid import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_NAME,
    METRICS,
    build_feature_extractor,
    distribution_scores,
    extract_features,
    load_real_images,
)
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
    add_guidance_option_arguments(parser)
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
    fid = parser.add_argument_group("FID / KID against real images (ldm/eval/fid.py)")
    fid.add_argument("--fid", metavar="REAL_DIR", default=None,
                     help="a folder of real images (png/jpg/webp, searched recursively, resized and centre-cropped "
                          "to the model's size); adds FID and KID of the generated images against them")
    fid.add_argument("--metrics", default=None, metavar="fid,kid",
                     help="which of fid,kid to compute against --fid (default: both)")
    fid.add_argument("--inception-weights", default=None, metavar="PATH",
                     help=f"the FID Inception weights file {INCEPTION_WEIGHTS_NAME} (default: ${INCEPTION_WEIGHTS_ENV})")
    fid.add_argument("--feature-extractor", default=None, metavar="MODULE:CALLABLE",
                     help="features from another network instead of Inception: a callable returning a module that "
                          "maps images [N,3,H,W] in [0,1] to [N,D] (your code, like --config); e.g. "
                          "ldm.eval.fid:demo_autoencoder_features")
    fid.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged")
    fid.add_argument("--kid-subset-size", type=int, default=None,
                     help="KID: images per subset (default: half the smaller set, at most 1000)")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def sampler_spec(name: str, steps: int, eta: float, args: argparse.Namespace | None = None) -> dict:
    """The sampler spec of the command line; ``args`` adds the guidance options that are set."""
    spec = {"name": name}
    if name != "ddpm":
        spec["num_steps"] = steps
    if name == "ddim":
        spec["eta"] = eta
    if args is not None:
        spec.update(guidance_settings(args))
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


def sweep(model: LatentDiffusion, args: argparse.Namespace, reference: "RealReference | None" = None) -> list[dict]:
    """Accuracy against network evaluations for every sampler and step count (and FID/KID with ``reference``);
    writes md, json and png."""
    samplers = args.sweep_samplers or sorted(SAMPLERS)
    runs = [(name, steps) for name in samplers if name != "ddpm" for steps in args.sweep_steps]
    if "ddpm" in samplers:
        runs.append(("ddpm", model.schedule.num_timesteps))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for name, steps in runs:
        sampler = model.build_sampler(sampler_spec(name, steps, args.eta, args))
        start = time.perf_counter()
        results, images = evaluate_model(model, sampler, args.guidance, args.n_samples, args.seed, args.batch_size,
                                         args.categories, progress=not args.no_progress, precision=args.precision)
        row = {"sampler": name, "steps": steps, "nfe": sampler.num_model_evaluations,
               "seconds": round(time.perf_counter() - start, 1), "overall": results["overall"]["accuracy"]}
        row.update({c: r["accuracy"] for c, r in results["per_category"].items()})
        if reference is not None:
            scores = reference.score(torch.cat(list(images.values())))
            row.update({"fid": scores.get("fid"), "kid": scores.get("kid", {}).get("mean")})
        rows.append(row)
        log.info("%s %d steps (%d NFE): overall %.3f", name, steps, row["nfe"], row["overall"])
        with open(os.path.join(args.out_dir, "sweep.json"), "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)  # after every row: an interrupted sweep keeps what it measured
    categories = [c for c in rows[0] if c not in ("sampler", "steps", "nfe", "seconds", "fid", "kid")]
    scores = [key for key in ("fid", "kid") if rows[0].get(key) is not None]
    lines = ["| sampler | steps | NFE | " + " | ".join(categories + [s.upper() for s in scores]) + " | seconds |",
             "|---|---:|---:|" + "---:|" * (len(categories) + len(scores)) + "---:|"]
    for row in rows:
        cells = " | ".join([f"{100 * row[c]:.1f}" for c in categories] + [f"{row[s]:.4g}" for s in scores])
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {cells} | {row['seconds']} |")
    table = "\n".join(lines)
    print("\n" + table)
    options = "".join(f", {key} {value}" for key, value in guidance_settings(args).items())
    settings = (f"{os.path.basename(args.ckpt)}, guidance {args.guidance:g}{options}, {args.precision}, "
                f"{args.n_samples} sample(s) per prompt, seed {args.seed}")
    if reference is not None:
        settings += f"; FID/KID against {args.fid}, features: {reference.description}"
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

    sampler = model.build_sampler(sampler_spec(args.sampler, args.steps, args.eta, args))
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


def requested_metrics(args: argparse.Namespace) -> tuple[str, ...]:
    """The distribution metrics asked for: ``--metrics`` (a comma list of fid, kid), both by default with ``--fid``,
    none without it. ``ValueError`` naming the flag for a wrong combination."""
    if args.metrics is None:
        return METRICS if args.fid else ()
    metrics = tuple(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics {args.metrics!r}: choose from {','.join(METRICS)} (comma-separated)")
    if not args.fid:
        raise ValueError(f"--metrics {args.metrics} needs --fid REAL_DIR, the folder of real images to compare with")
    return metrics


class RealReference:
    """What FID/KID compare against, prepared before any sampling (a missing file fails first): the feature
    network and the real images' features."""

    def __init__(self, args: argparse.Namespace):
        if args.task != "txt2img":
            raise ValueError("--fid works with --task txt2img only")
        if not os.path.isdir(args.fid):
            raise FileNotFoundError(f"--fid {args.fid}: no such folder of real images")
        self.metrics = requested_metrics(args)
        self.extractor = build_feature_extractor(args.feature_extractor, args.inception_weights)
        self.batch_size = args.batch_size
        self.kid_subsets = args.kid_subsets
        self.kid_subset_size = args.kid_subset_size
        self.seed = args.seed
        self.folder = args.fid
        self.features = None

    def load_real(self, image_size: int) -> "RealReference":
        """Read the real images at the model's size and keep their features."""
        self.features = extract_features(self.extractor, load_real_images(self.folder, image_size), self.batch_size)
        log.info("%d real images from %s, features: %s", self.features.shape[0], self.folder, self.description)
        return self

    @property
    def description(self) -> str:
        return getattr(self.extractor, "description", type(self.extractor).__name__)

    def score(self, images: torch.Tensor) -> dict:
        """FID/KID of generated images ``[N, 3, H, W]`` in [-1, 1] against the real set."""
        fake = extract_features(self.extractor, images, self.batch_size)
        scores = distribution_scores(self.features, fake, self.metrics, self.kid_subsets, self.kid_subset_size,
                                     self.seed)
        scores["features"] = self.description
        scores["real_dir"] = os.path.abspath(self.folder)
        return scores


def format_distribution_scores(scores: dict) -> str:
    """One line: ``FID 12.3  KID 0.0123 +- 0.0010 (N real, M generated; features)``."""
    parts = []
    if "fid" in scores:
        parts.append(f"FID {scores['fid']:.4g}")
    if "kid" in scores:
        parts.append(f"KID {scores['kid']['mean']:.4g} +- {scores['kid']['std']:.2g}")
    return (f"{'  '.join(parts)}  ({scores['n_real']} real, {scores['n_generated']} generated images; "
            f"features: {scores['features']})")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    if args.sampler not in SAMPLERS:
        raise SystemExit(f"error: unknown sampler {args.sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: checkpoint not found: {args.ckpt}")
    requested_metrics(args)  # a wrong flag combination, a missing folder or weights file fail before the model loads
    reference = RealReference(args) if args.fid else None
    model = LatentDiffusion.from_checkpoint(args.ckpt).eval()
    if reference is not None:
        reference.load_real((model.config or {}).get("image_size", 64))
    if args.task != "txt2img":
        return evaluate_editing(model, args)
    if args.sweep:
        return {"sweep": sweep(model, args, reference)}
    sampler = model.build_sampler(sampler_spec(args.sampler, args.steps, args.eta, args))
    start = time.perf_counter()
    results, images = evaluate_model(
        model, sampler, args.guidance, n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size,
        categories=args.categories, progress=not args.no_progress, precision=args.precision,
    )
    seconds = time.perf_counter() - start
    options = "".join(f", {key} {value}" for key, value in guidance_settings(args).items())
    print(f"\n{args.sampler} {sampler.num_model_evaluations} network evaluations, guidance {args.guidance}{options}, "
          f"{args.precision}, {args.n_samples} sample(s) per prompt, {seconds:.0f} s\n")
    print(format_table(results))
    accuracy = {c: row["accuracy"] for c, row in results["per_category"].items()}
    accuracy["overall"] = results["overall"]["accuracy"]
    distribution = None
    if reference is not None:
        distribution = reference.score(torch.cat(list(images.values())))
        print("\n" + format_distribution_scores(distribution))
        accuracy.update({key: distribution[key] for key in ("fid", "kid") if key in distribution})
    if args.grid_dir:
        for category, grid in images.items():
            save_grid(grid, os.path.join(args.grid_dir, f"{category}.png"), nrow=8)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        items = [{k: v for k, v in item.items() if k in ("category", "prompt", "correct", "colour_ok", "shape_ok",
                                                          "size_ok", "position_ok", "count_ok")}
                 for item in results["items"]]
        with open(args.json, "w", encoding="utf-8") as handle:
            report = {"settings": vars(args), "seconds": seconds, "per_category": results["per_category"],
                      "overall": results["overall"], "items": items}
            if distribution is not None:
                report["distribution"] = distribution
            json.dump(report, handle, indent=2, default=str)
    return accuracy


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
