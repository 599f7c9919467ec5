"""Convert a checkpoint between our one-file format, Stable Diffusion's original single file and diffusers folders.

    python scripts/convert_checkpoint.py --ckpt runs/x/model.safetensors --to sd --out sd-model.safetensors
        # also writes sd-model.yaml: the original inference config SD's scripts (and A1111, ComfyUI) take
    python scripts/convert_checkpoint.py --ckpt v2-1_768-ema-pruned.safetensors \\
        --config configs/stable-diffusion/v2-inference-v.yaml --to ours --out sd21-768.safetensors
    python scripts/convert_checkpoint.py --ckpt runs/x/model.safetensors --to diffusers --out my-model-diffusers
        # a folder StableDiffusionPipeline.from_pretrained loads (needs: pip install -e ".[diffusers]")
    python scripts/convert_checkpoint.py --ckpt my-model-diffusers --to ours --out back.safetensors

Files are read by content (safetensors, or a torch checkpoint with ``weights_only=True`` only).
"""

from __future__ import annotations

import argparse
import logging
import os


import torch

from ldm.cli import run
from ldm.interop import add_checkpoint_arguments
from ldm.interop.export import FORMATS, convert_checkpoint
from ldm.threads import add_threads_argument, configure_threads
from ldm.util import add_allow_target_argument


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="our .safetensors, an original Stable Diffusion file or a diffusers folder")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the .safetensors to write (sd: a .yaml is written beside it; "
                        "diffusers: a new folder)")
    add_checkpoint_arguments(parser)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="cast the weights (default: as loaded, float32)")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    written = convert_checkpoint(args.ckpt, args.to, args.out, config=args.config,
                                 parameterization=args.parameterization, use_ema=args.use_ema or None,
                                 dtype=getattr(torch, args.dtype) if args.dtype else None)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
