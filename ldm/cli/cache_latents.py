"""Precompute the autoencoder's posterior (and a frozen text encoder's contexts) for every training image.

    ldm cache-latents --autoencoder runs/ae/autoencoder.safetensors --data DIR --out cache/ [--size 256]
        [--crop center|random] [--flip] [--text-encoder-from runs/ldm/model.safetensors] [--batch-size 32]
        [--dtype float32|bfloat16|float16] [--device cuda]
    ldm train-diffusion ... --data cache/          # trains without running the encoders

Each image's posterior mean and std are stored (not one latent), so training still draws a new latent from q(z|x)
every epoch. ``--flip`` also stores the mirrored images' posteriors, and training picks one of the two per item.
``--text-encoder-from`` takes a whole-model file written by train-diffusion and caches its (frozen) text encoder's
contexts; a model whose text encoder trains (cond_stage_trainable) ignores them. The cache records the autoencoder's
fingerprint, scale factor, image size, crop and flips: training a model with another autoencoder or scale factor
is refused. See :mod:`ldm.data.latent_cache` for the format.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from tqdm.auto import tqdm

from autoencoder.io import load_autoencoder
from ldm.cli import run
from ldm.data.latent_cache import DTYPES, autoencoder_fingerprint, write_latent_cache
from ldm.data.sources import CACHE_MANIFEST, data_kind, dataset_node
from ldm.threads import add_threads_argument, configure_threads
from ldm.util import add_allow_target_argument, instantiate_from_config

log = logging.getLogger("cache_latents")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", required=True,
                        help="stage-one weights (.safetensors with the scale factor, from train-autoencoder)")
    parser.add_argument("--data", required=True, help="a captioned image folder or WebDataset shards")
    parser.add_argument("--out", required=True, help="the cache folder (must not hold a cache already)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (shorter side resized, cropped)")
    parser.add_argument("--crop", default="center", choices=["center", "random"],
                        help="random: one random crop per image, fixed at caching time (--seed)")
    parser.add_argument("--flip", action="store_true", help="also cache the mirrored images (flip augmentation)")
    parser.add_argument("--text-encoder-from", default=None, metavar="MODEL",
                        help="a whole-model .safetensors from train-diffusion: cache its text encoder's contexts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--chunk-size", type=int, default=1024, help="samples per chunk file")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="storage dtype (bfloat16 halves the disk; float16 loses tiny stds)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random crops")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the arguments, before any model is loaded."""
    for name in ("size", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if os.path.isfile(os.path.join(args.out, CACHE_MANIFEST)):
        raise ValueError(f"--out {args.out} already holds a latent cache ({CACHE_MANIFEST}); choose another folder "
                         f"or delete it first")
    if data_kind(args.data) == "cache":
        raise ValueError(f"--data {args.data} is a latent cache already; give the images it was made from")


def load_text_encoder(path: str, autoencoder: torch.nn.Module, scale_factor: float, device: torch.device):
    """The text encoder of the whole-model file ``path``, frozen, on ``device``. Warns when the file's own
    autoencoder or scale factor differ from ``--autoencoder``'s: that model would then refuse this cache."""
    from ldm.models.latent_diffusion import LatentDiffusion

    model = LatentDiffusion.from_checkpoint(path)
    if autoencoder_fingerprint(model.first_stage_model) != autoencoder_fingerprint(autoencoder):
        log.warning("%s holds another autoencoder than --autoencoder: training it (--init-from) on this cache will be "
                    "refused", path)
    elif abs(model.scale_factor - scale_factor) > 1e-6 * scale_factor:
        log.warning("%s has scale factor %s, --autoencoder %s: training it on this cache will be refused", path,
                    model.scale_factor, scale_factor)
    return model.cond_stage_model.requires_grad_(False).eval().to(device)


def main(argv=None) -> str:
    """Write the cache; returns the ``--out`` folder."""
    args = parse_args(argv)
    configure_threads(args.threads)
    check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autoencoder, scale_factor = load_autoencoder(args.autoencoder, map_location=device)
    autoencoder.latent_shape(args.size, args.size)  # a size the autoencoder cannot take fails before any work
    text_encoder = None
    if args.text_encoder_from:
        text_encoder = load_text_encoder(args.text_encoder_from, autoencoder, scale_factor, device)
    node = dataset_node(args.data, args.size, crop=args.crop, flip=False, caption_source="auto")
    dataset = instantiate_from_config(node, path="--data")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers)
    torch.manual_seed(args.seed)  # the random crops (drawn in the loader's workers or here)
    try:
        total = len(loader)
    except TypeError:  # a stream of shards has no length
        total = None
    batches = tqdm(loader, total=total, desc="cache-latents", unit="batch", disable=args.no_progress)
    manifest = write_latent_cache(
        args.out, autoencoder, scale_factor, batches, image_size=args.size, crop=args.crop,
        flips="both" if args.flip else "none", text_encoder=text_encoder, dtype=args.dtype,
        source=os.path.abspath(args.data) if os.path.exists(args.data) else args.data,
        autoencoder_path=os.path.abspath(args.autoencoder),
        text_encoder_path=os.path.abspath(args.text_encoder_from) if args.text_encoder_from else None,
        chunk_size=args.chunk_size,
    )
    print(f"cached {manifest['num_samples']} images ({'both flips' if args.flip else 'no flips'}, latents "
          f"{manifest['latent_shape']}{', contexts' if text_encoder is not None else ''}, {args.dtype}) in "
          f"{len(manifest['chunks'])} chunk(s) under {args.out}")
    return args.out


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
