"""Repaint the white part of a mask with a prompt; the rest of the image is kept.

    ldm inpaint --image scene.png --mask mask.png --prompt "a green square in the top left"
    python scripts/inpaint.py --image in.png --mask m.png --from-file prompts.txt --sampler dpmpp_2m --n-samples 4

Any model repaints by putting the known region back at every step; Stable Diffusion's inpainting checkpoints (a
9-channel UNet, e.g. ``--ckpt sd-v1-5-inpainting.ckpt``) condition on the mask instead (``ldm/inpainting.py``).
The known pixels are pasted back after decoding through a slightly feathered mask. The mask is resized to the image
(with a warning) and thresholded at 0.5 when it is not black and white; the image is resized to the model's size or
kept with ``--keep-size``. PNGs carry ``image`` and ``mask`` in their metadata beside txt2img's settings.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from PIL import Image

from ldm.cli import run
from ldm.cli.img2img import input_image
from ldm.cli.txt2img import build_parser, prepare, save_outputs
from ldm.generate import generate
from ldm.threads import configure_threads

log = logging.getLogger("inpaint")


def parse_args(argv=None):
    parser = build_parser(__doc__, "outputs/inpaint")
    parser.add_argument("--image", required=True, help="the image to repaint")
    parser.add_argument("--mask", required=True, help="white = repaint, black = keep (grey: thresholded at 0.5)")
    parser.add_argument("--jumps", type=int, default=0,
                        help="RePaint resampling: take each step this many more times, going back to its noise level "
                             "in between (more agreement at the seam, (jumps + 1) x the cost); not for 9-channel models")
    parser.add_argument("--keep-size", action="store_true",
                        help="keep the image's size (a multiple of the model's factor) instead of the model's size")
    return parser.parse_args(argv)


def load_mask(path: str) -> torch.Tensor:
    """``[1, 1, H, W]`` in [0, 1] from any image (its luminance; transparency counts as black)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--mask: no such file {path}")
    try:
        with Image.open(path) as opened:
            grey = np.asarray(opened.convert("L"), dtype=np.float32) / 255.0
    except OSError as error:
        raise ValueError(f"--mask {path}: not a readable image ({error})") from None
    return torch.from_numpy(grey)[None, None]


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {flag}: no such file {path}")
    if args.jumps < 0:
        raise SystemExit(f"error: --jumps must be >= 0, got {args.jumps}")
    session = prepare(args)
    image = input_image(session, args.image, args.keep_size, "--image")
    mask = load_mask(args.mask)
    count = len(session.jobs)
    start = time.perf_counter()
    images = generate(
        session.model, session.jobs, session.sampler, session.seeds, guidance_scale=args.guidance,
        height=image.shape[1], width=image.shape[2], batch_size=args.batch_size, autocast=session.autocast,
        progress=not args.no_progress, decode_dtype=session.decode_dtype,
        init_images=image[None].expand(count, -1, -1, -1), masks=mask.expand(count, -1, -1, -1), jumps=args.jumps,
    )
    extra = {"image": os.path.abspath(args.image), "mask": os.path.abspath(args.mask), "jumps": args.jumps}
    return save_outputs(session, args, images, extra, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
