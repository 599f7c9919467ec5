"""The whole pipeline on the embedded shapes dataset, end to end on a CPU (``make demo``).

1. train the demo autoencoder (``configs/demo/autoencoder.yaml``) and measure its latent scale factor;
2. train the text-conditioned UNet on its latents (``configs/demo/diffusion.yaml``);
3. sample a grid for a fixed prompt list with DDIM and score it with the shapes evaluator.

Everything lands in ``--out`` (default ``runs/demo``); stage wall times are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time


import torch

from ldm.cli import run
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.run_folder import holds_a_run
from ldm.threads import add_threads_argument, configure_threads
from ldm.util import add_allow_target_argument
from ldm.cli import evaluate, train_autoencoder, train_diffusion, txt2img

DEMO_PROMPTS = [
    "a red circle",
    "a green square",
    "a blue triangle",
    "a white circle in the top left",
    "a large yellow square in the center",
    "a small cyan circle in the bottom right",
    "a red square in the top right and a blue circle in the bottom left",
    "a yellow triangle",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--autoencoder-config", default="demo/autoencoder", help="a path or a shipped config's name")
    parser.add_argument("--diffusion-config", default="demo/diffusion", help="a path or a shipped config's name")
    parser.add_argument("--autoencoder-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="override the config's max_steps")
    for stage in ("autoencoder", "diffusion"):
        parser.add_argument(f"--{stage}-override", action="append", default=[], metavar="KEY=VALUE",
                            help=f"a dotlist override of the {stage} config, as train_{stage}.py takes (repeatable), "
                                 f"e.g. --diffusion-override trainer.params.high_noise_prob=0")
    parser.add_argument("--eval-samples", type=int, default=1, help="samples per evaluation prompt (0 skips it)")
    parser.add_argument("--export", default=None,
                        help="also write the trained model here in float16 (how ldm/assets/demo-shapes.safetensors is made)")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    for stage in ("autoencoder", "diffusion"):
        if holds_a_run(os.path.join(args.out, stage)):
            raise SystemExit(f"error: {args.out} holds an earlier demo run ({stage}); remove it first (make clean-demo) "
                             f"or give another --out (make demo DEMO_DIR=runs/demo2)")
    os.makedirs(args.out, exist_ok=True)
    times = {}

    start = time.perf_counter()
    ae_args = ["--config", args.autoencoder_config, "--run-dir", os.path.join(args.out, "autoencoder")]
    if args.autoencoder_steps:
        ae_args += ["--max-steps", str(args.autoencoder_steps)]
    ae_args += args.autoencoder_override
    autoencoder_weights = train_autoencoder.main(ae_args)
    times["autoencoder (train + scale factor)"] = time.perf_counter() - start

    start = time.perf_counter()
    ldm_args = [
        "--config", args.diffusion_config, "--autoencoder", autoencoder_weights,
        "--run-dir", os.path.join(args.out, "diffusion"),
    ]
    if args.diffusion_steps:
        ldm_args += ["--max-steps", str(args.diffusion_steps)]
    ldm_args += args.diffusion_override
    weights = train_diffusion.main(ldm_args)
    times["diffusion (train)"] = time.perf_counter() - start
    if args.export:
        LatentDiffusion.from_checkpoint(weights).save(args.export, dtype=torch.float16)
        print(f"exported float16 weights to {args.export} ({os.path.getsize(args.export) / 2**20:.1f} MiB)")

    start = time.perf_counter()
    prompt_file = os.path.join(args.out, "prompts.txt")
    with open(prompt_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(DEMO_PROMPTS) + "\n")
    txt2img.main(["--from-file", prompt_file, "--ckpt", weights, "--outdir", os.path.join(args.out, "samples"),
                  "--n-samples", "4", "--no-progress"])
    times["sampling (DDIM 50, 8 prompts x 4)"] = time.perf_counter() - start

    report = {"weights": weights, "grid": os.path.join(args.out, "samples", "grid.png")}
    if args.eval_samples > 0:
        start = time.perf_counter()
        report["accuracy"] = evaluate.main(
            ["--ckpt", weights, "--n-samples", str(args.eval_samples), "--json", os.path.join(args.out, "eval.json")]
        )
        times["evaluation (DDIM 50)"] = time.perf_counter() - start
    report["seconds"] = {name: round(value, 1) for name, value in times.items()}
    with open(os.path.join(args.out, "demo.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print("\n| stage | wall time |\n|---|---|")
    for name, value in times.items():
        print(f"| {name} | {value / 60:.1f} min |")
    print(f"| total | {sum(times.values()) / 60:.1f} min |")
    print(f"\nsample grid: {report['grid']}\nweights: {weights}")
    return report


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
