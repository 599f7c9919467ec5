"""Edit an image with a prompt (SDEdit), with any sampler: the txt2img loop started part-way.

    ldm img2img --init-img photo.png --prompt "a blue square" --strength 0.6
    python scripts/img2img.py --init-img in.png --from-file prompts.txt --sampler euler_a --steps 30 --n-samples 4

The image is encoded, noised to the sampler's own grid and denoised from there: of ``--steps`` steps the last
``round(strength * steps)`` run (as SD's and diffusers' img2img count). ``--strength 0`` gives the autoencoder's
reconstruction of the input, ``--strength 1`` exactly txt2img's image for the same seed. Grey and RGBA inputs are
converted (transparency composited onto white, EXIF orientation applied); the image is resized to the model's size,
or kept with ``--keep-size`` (then a multiple of the model's factor). PNGs carry ``init_img`` and ``strength`` in
their metadata beside txt2img's settings.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from PIL import Image

from ldm.cli import run
from ldm.cli.txt2img import build_parser, prepare, save_outputs
from ldm.data.image_folder import decode_image, pil_to_tensor
from ldm.generate import generate
from ldm.threads import configure_threads

log = logging.getLogger("img2img")


def parse_args(argv=None):
    parser = build_parser(__doc__, "outputs/img2img")
    parser.add_argument("--init-img", required=True, help="the image to edit")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much to change: 0 keeps the image (its VAE round trip), 1 ignores it (txt2img)")
    parser.add_argument("--keep-size", action="store_true",
                        help="keep the image's size (a multiple of the model's factor) instead of resizing it to the "
                             "model's training size")
    return parser.parse_args(argv)


def load_init_image(path: str, size: tuple[int, int] | None) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1]: any mode made RGB (alpha onto white, EXIF orientation applied), resized to
    ``size = (height, width)`` unless ``None``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-img: no such file {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = decode_image(opened)
    except OSError as error:
        raise ValueError(f"--init-img {path}: not a readable image ({error})") from None
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return pil_to_tensor(image)


def input_image(session, path: str, keep_size: bool, flag: str) -> torch.Tensor:
    """The image to edit, ``[3, H, W]`` in [-1, 1], at the model's size or kept (then a size the model takes)."""
    image = load_init_image(path, None if keep_size else (session.train_size, session.train_size))
    try:
        session.model.latent_shape(*image.shape[-2:])
    except ValueError as error:
        raise SystemExit(f"error: {flag} {path} with --keep-size: {error}")
    return image


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    if not 0.0 <= args.strength <= 1.0:
        raise SystemExit(f"error: --strength must be in [0, 1], got {args.strength}")
    if not os.path.isfile(args.init_img):
        raise SystemExit(f"error: --init-img: no such file {args.init_img}")
    session = prepare(args)
    image = input_image(session, args.init_img, args.keep_size, "--init-img")
    start = time.perf_counter()
    images = generate(
        session.model, session.jobs, session.sampler, session.seeds, guidance_scale=args.guidance,
        height=image.shape[1], width=image.shape[2], batch_size=args.batch_size, autocast=session.autocast,
        progress=not args.no_progress, decode_dtype=session.decode_dtype,
        init_images=image[None].expand(len(session.jobs), -1, -1, -1), strength=args.strength,
    )
    extra = {"init_img": os.path.abspath(args.init_img), "strength": args.strength}
    return save_outputs(session, args, images, extra, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
