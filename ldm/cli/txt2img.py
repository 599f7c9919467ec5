"""Text to image with a trained latent diffusion checkpoint (one ``.safetensors`` file).

    python scripts/txt2img.py --prompt "a red circle"                      # the shipped demo weights
    python scripts/txt2img.py --from-file prompts.txt --ckpt runs/x/model.safetensors --sampler ddim --steps 50
    python scripts/txt2img.py --prompt "a photo of a cat" --ckpt v2-1_768-ema-pruned.safetensors \
        --config configs/stable-diffusion/v2-inference-v.yaml --height 768 --width 768   # an original SD file

Every image is written as PNG with the prompt and settings in its text metadata, plus a grid per run.
The same ``--seed`` gives the same images. Everything that can be wrong (checkpoint, sampler, size,
precision) is checked before any sampling work starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from ldm.assets import DEMO_CHECKPOINT
from ldm.cli import run
from ldm.diffusion import SAMPLERS
from ldm.generate import PRECISIONS, autocast_for, generate
from ldm.images import save_grid, save_png_with_metadata
from ldm.inference import prepare_for_inference
from ldm.interop import add_checkpoint_arguments, load_model
from ldm.threads import add_threads_argument, configure_threads
from ldm.util import add_allow_target_argument

log = logging.getLogger("txt2img")


def build_parser(description: str, outdir: str) -> argparse.ArgumentParser:
    """The options every generating command shares (txt2img, img2img): prompts, checkpoint, sampler, seeds,
    output, device and precision."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text prompt")
    source.add_argument("--from-file", help="a text file with one prompt a line")
    parser.add_argument("--ckpt", default=None,
                        help=f"our .safetensors (config inside), an original Stable Diffusion .ckpt/.safetensors or a "
                             f"diffusers folder; default: {DEMO_CHECKPOINT}")
    add_checkpoint_arguments(parser)
    parser.add_argument("--sampler", default="ddim", help=f"one of {sorted(SAMPLERS)}")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (DDPM uses all of the schedule's)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    add_guidance_option_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="image k of the run uses seed + k (its own noise stream)")
    parser.add_argument("--n-samples", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="images sampled at once")
    parser.add_argument("--outdir", default=outdir)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                        help="NHWC weights and activations (ldm/inference.py); auto: on for CUDA")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and VAE decoder (first call compiles; CPU needs a C++ compiler)")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser


def add_guidance_option_arguments(parser: argparse.ArgumentParser) -> None:
    """``--guidance-rescale PHI`` and ``--guidance-interval SIGMA_LO SIGMA_HI``: the samplers' guidance options
    (:class:`ldm.diffusion.samplers.base.Sampler`), shared by txt2img, img2img, inpaint and evaluate."""
    parser.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="rescale the guided prediction's std to the conditional one's and blend with weight PHI "
                             "in [0, 1] (Lin et al. 2023; 0.7 is their choice; 0 = off)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                        help="guide only the steps whose noise level sigma = sqrt((1 - abar_t) / abar_t) lies in "
                             "(SIGMA_LO, SIGMA_HI] (Kynkaanniemi et al. 2024); the other steps use the conditional "
                             "prediction alone, one network pass instead of two. In sigma, not timesteps; 'inf' for "
                             "no upper end")


def guidance_settings(args: argparse.Namespace) -> dict:
    """The sampler-spec keys of the guidance options that are set (none by default, so specs stay as before)."""
    settings = {}
    if getattr(args, "guidance_rescale", 0.0):
        settings["guidance_rescale"] = args.guidance_rescale
    if getattr(args, "guidance_interval", None) is not None:
        settings["guidance_interval"] = list(args.guidance_interval)
    return settings


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser(__doc__, "outputs/txt2img")
    parser.add_argument("--height", type=int, default=None, help="default: the model's training size")
    parser.add_argument("--width", type=int, default=None)
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not os.path.isfile(args.from_file):
            raise FileNotFoundError(f"--from-file: no such file {args.from_file}")
        with open(args.from_file, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
        if not prompts:
            raise ValueError(f"--from-file: {args.from_file} holds no prompt")
    return prompts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def sampler_settings(args: argparse.Namespace) -> dict:
    settings = {"name": args.sampler}
    if args.sampler != "ddpm":
        settings["num_steps"] = args.steps
    if args.sampler == "ddim":
        settings["eta"] = args.eta
    settings.update(guidance_settings(args))
    return settings


@dataclass
class Session:
    """What a generating command has set up before the first image: the model on its device, the sampler, the
    jobs (one prompt per image) with their seeds, and how to run and decode."""

    model: Any
    sampler: Any
    device: torch.device
    autocast: Any
    decode_dtype: torch.dtype
    prompts: list[str]
    jobs: list[str]
    seeds: list[int]
    ckpt: str

    @property
    def train_size(self) -> int:
        return int(self.model.config.get("image_size", 64)) if self.model.config else 64


def prepare(args: argparse.Namespace) -> Session:
    """Check everything that needs no model, load it, build the sampler; ``SystemExit('error: ...')`` for a
    user's mistake."""
    if args.sampler not in SAMPLERS:
        raise SystemExit(f"error: unknown sampler {args.sampler!r}; choose one of {sorted(SAMPLERS)}")
    if args.n_samples < 1 or args.batch_size < 1:
        raise SystemExit("error: --n-samples and --batch-size must be >= 1")
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    try:
        autocast = autocast_for(device, args.precision)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    ckpt = args.ckpt or DEMO_CHECKPOINT
    if not os.path.exists(ckpt):  # a file, or a diffusers folder
        raise SystemExit(f"error: checkpoint not found: {ckpt}")
    model = load_model(ckpt, config=args.config, parameterization=args.parameterization,
                       use_ema=args.use_ema or None).eval()
    try:
        sampler = model.build_sampler(sampler_settings(args))
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    model.to(device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    prepare_for_inference(model, channels_last=channels_last, compile=args.compile)
    decode_dtype = torch.float32
    if device.type == "cuda" and args.precision == "fp16" and torch.cuda.is_bf16_supported():
        decode_dtype = torch.bfloat16  # fp16 VAE decoders overflow into black images
    model.first_stage_model.to(decode_dtype)
    jobs = [prompt for prompt in prompts for _ in range(args.n_samples)]
    seeds = [args.seed + k for k in range(len(jobs))]
    return Session(model, sampler, device, autocast, decode_dtype, prompts, jobs, seeds, ckpt)


def save_outputs(session: Session, args: argparse.Namespace, images: torch.Tensor, extra: dict | None = None,
                 seconds: float = 0.0) -> list[str]:
    """Each image as PNG with the prompt and settings in its text metadata (``parameters`` as JSON, and each key
    alone), plus ``grid.png``; returns the image paths."""
    os.makedirs(args.outdir, exist_ok=True)
    height, width = images.shape[-2:]
    written = []
    for prompt, seed, image in zip(session.jobs, session.seeds, images):
        metadata = {
            "prompt": prompt,
            "seed": seed,
            "sampler": args.sampler,
            "steps": session.sampler.num_model_evaluations if args.sampler == "ddpm" else args.steps,
            "eta": args.eta,
            "guidance": args.guidance,
            **guidance_settings(args),
            "checkpoint": os.path.abspath(session.ckpt),
            "precision": args.precision,
            "size": f"{width}x{height}",
            **(extra or {}),
        }
        path = os.path.join(args.outdir, f"{len(written):05d}-seed{seed}.png")
        save_png_with_metadata(image, path, {"parameters": json.dumps(metadata), **{k: str(v) for k, v in metadata.items()}})
        written.append(path)
    grid_path = os.path.join(args.outdir, "grid.png")
    save_grid(images, grid_path, nrow=max(1, args.n_samples if len(session.prompts) > 1 else min(len(images), 8)))
    log.info("wrote %d images and %s in %.1f s (%.2f s/image)", len(written), grid_path, seconds,
             seconds / max(1, len(written)))
    return written


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    session = prepare(args)
    height, width = args.height or session.train_size, args.width or session.train_size
    try:
        session.model.latent_shape(height, width)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    start = time.perf_counter()
    images = generate(
        session.model, session.jobs, session.sampler, session.seeds, guidance_scale=args.guidance, height=height,
        width=width, batch_size=args.batch_size, autocast=session.autocast, progress=not args.no_progress,
        decode_dtype=session.decode_dtype,
    )
    return save_outputs(session, args, images, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
