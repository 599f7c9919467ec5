"""Reconstruction quality of autoencoder weights on the validation split: PSNR, SSIM and LPIPS.

    python scripts/evaluate_autoencoder.py --ckpt runs/<run>/autoencoder.safetensors [--num-images N]
        [--json OUT] [--config YAML | --data DIR] [--batch-size B] [--sample-posterior]

Images are reconstructed through the posterior mode (deterministic) unless ``--sample-posterior``. PSNR and SSIM
are computed on [0, 1] images (PSNR over the whole image, SSIM with torchmetrics' Gaussian 11x11 window); LPIPS
(VGG) only when torchvision's pretrained VGG weights are already in the torch hub cache, otherwise it is
reported as unavailable (nothing is downloaded). A table is printed; ``--json`` writes the numbers.
The validation data come from the ``data_config`` stored with the weights, ``--config`` or ``--data``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path


import torch

from autoencoder.io import load_autoencoder
from autoencoder.losses import PerceptualLoss, backbone_cache_path, pretrained_backbone_available
from autoencoder.metrics import psnr, ssim
from ldm.checkpoint import atomic_write
from ldm.cli import run
from ldm.threads import add_threads_argument, configure_threads
from ldm.training import build_dataloader
from ldm.util import add_allow_target_argument
from ldm.cli.compute_scale_factor import dataset_node


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="autoencoder .safetensors")
    parser.add_argument("--num-images", type=int, default=256, help="validation images to evaluate (at most the split)")
    parser.add_argument("--json", default=None, help="write the metrics here")
    parser.add_argument("--config", default=None, help="take the validation data from this config's data section")
    parser.add_argument("--data", default=None, help="take the validation data from this image folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sample-posterior", action="store_true", help="decode posterior samples instead of the mode")
    parser.add_argument("--seed", type=int, default=0)
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def _summary(values: list[torch.Tensor]) -> dict:
    v = torch.cat(values).double()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


@torch.no_grad()
def evaluate(model, loader, num_images: int, lpips_model=None, sample_posterior: bool = False, seed: int = 0) -> dict:
    """Per-image PSNR/SSIM(/LPIPS) over the first ``num_images`` images of ``loader``; returns the summaries."""
    generator = torch.Generator().manual_seed(seed)
    values = {"psnr": [], "ssim": [], "lpips": []}
    seen = 0
    for batch in loader:
        x = batch["image"] if isinstance(batch, dict) else batch
        x = x[: num_images - seen]
        posterior = model.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        rec = model.decode(z).clamp(-1, 1)
        values["psnr"].append(psnr(x, rec))
        values["ssim"].append(ssim(x, rec))
        if lpips_model is not None:
            values["lpips"].append(lpips_model(x, rec).flatten())
        seen += x.shape[0]
        if seen >= num_images:
            break
    if seen == 0:
        raise ValueError("the validation data yielded no images")
    result = {"num_images": seen}
    for name, vals in values.items():
        result[name] = _summary(vals) if vals else None
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_threads(args.threads)
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    model, scale_factor = load_autoencoder(args.ckpt, require_scale_factor=False)
    size = int(model.ddconfig["resolution"])
    node, _ = dataset_node(args.ckpt, "validation", args.config, args.data, size)
    loader = build_dataloader(node, args.batch_size, shuffle=False, path="data.validation")

    lpips_model, lpips_note = None, None
    if pretrained_backbone_available("vgg"):
        lpips_model = PerceptualLoss("pretrained", "vgg", allow_download=False).eval()
    else:
        lpips_note = f"unavailable: pretrained VGG weights not found at {backbone_cache_path('vgg')}"

    start = time.perf_counter()
    result = evaluate(model, loader, args.num_images, lpips_model, args.sample_posterior, args.seed)
    result.update({
        "ckpt": os.path.abspath(args.ckpt),
        "scale_factor": scale_factor,
        "reconstruction": "posterior sample" if args.sample_posterior else "posterior mode",
        "seconds": time.perf_counter() - start,
    })
    if result["lpips"] is None:
        result["lpips"] = lpips_note

    print(f"{'metric':<8} {'mean':>9} {'std':>9} {'min':>9} {'max':>9}   ({result['num_images']} validation images)")
    for name, unit in (("psnr", "dB"), ("ssim", ""), ("lpips", "")):
        stats = result[name]
        if isinstance(stats, dict):
            print(f"{name:<8} {stats['mean']:>9.4f} {stats['std']:>9.4f} {stats['min']:>9.4f} {stats['max']:>9.4f}   {unit}")
        else:
            print(f"{name:<8} {stats}")
    if args.json:
        text = json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
        print(f"metrics written to {args.json}")
    return result


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
