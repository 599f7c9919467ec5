"""How visible one object still is in x_T, per noise schedule: the check behind the shapes configs' schedule.

    python scripts/layout_leak.py [--ckpt PATH]

Encodes single-object renders of the shapes dataset with the model's autoencoder (posterior mean, scaled), takes
each object's latent footprint ``z(object) - z(empty image)`` and prints its matched-filter signal-to-noise ratio
at the last timestep (``ldm.diffusion.matched_filter_snr``) under Stable Diffusion's ``scaled_linear`` schedule and
the ``cosine`` one. Above ~1 the layout is readable from ``x_T`` during training, but sampling starts from pure noise.
A second table gives, per schedule, the timestep from which that SNR stays below 4 and below 1: only training draws
above it teach the model where the prompt puts an object (the shapes configs' ``high_noise_from``).
"""

from __future__ import annotations

import argparse
import os


import torch

from ldm.assets import DEMO_CHECKPOINT
from ldm.cli import run
from ldm.data.shapes import SHAPES, SIZES, ShapeSpec, render
from ldm.diffusion import NoiseSchedule
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.threads import add_threads_argument, configure_threads
from ldm.util import add_allow_target_argument

SCHEDULES = {
    "scaled_linear (SD)": dict(kind="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012),
    "cosine": dict(kind="cosine", num_timesteps=1000),
}


@torch.no_grad()
def object_footprints(model: LatentDiffusion, size: str, colour: str = "white", position: str = "top left"):
    """Scaled latent ``z(object) - z(empty)`` for each shape: ``[len(SHAPES), C, h, w]``."""
    def encode(specs):
        image = torch.from_numpy(render(specs)).permute(2, 0, 1).float() / 127.5 - 1
        return model.encode_images(image[None], sample=False)[0]

    empty = encode([])
    return torch.stack([encode([ShapeSpec(shape, colour, size, position)]) - empty for shape in SHAPES])


def snr_curves(model: LatentDiffusion) -> dict[tuple[str, str], torch.Tensor]:
    """``{(schedule, size): float64 [T]}``: the mean over the shapes of ``matched_filter_snr(footprint, abar_t)``
    at every ``t``, i.e. ``abar_t / (1 - abar_t) * mean ||footprint||^2`` (each footprint is encoded once)."""
    curves = {}
    for size in SIZES:
        energy = object_footprints(model, size).double().pow(2).sum(dim=(1, 2, 3)).mean()
        for name, params in SCHEDULES.items():
            abar = NoiseSchedule(**params).alphas_cumprod.double()
            curves[(name, size)] = abar * energy / (1 - abar)
    return curves


def hidden_from(
    curves: dict[tuple[str, str], torch.Tensor], thresholds=(4.0, 1.0)
) -> dict[tuple[str, str, float], int | None]:
    """``{(schedule, size, threshold): first t from which the SNR curve stays below threshold}`` (``None`` when it
    is still above at ``t = T - 1``)."""
    result = {}
    for (name, size), snr in curves.items():
        for threshold in thresholds:
            visible = (snr >= threshold).nonzero()
            last_visible = int(visible[-1]) if len(visible) else -1
            result[(name, size, threshold)] = last_visible + 1 if last_visible + 1 < len(snr) else None
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=DEMO_CHECKPOINT, help="a whole-model file (its autoencoder is used)")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    model = LatentDiffusion.from_checkpoint(args.ckpt).eval()
    curves = snr_curves(model)
    table = {key: float(snr[-1]) for key, snr in curves.items()}  # at t = T
    print("| schedule | alpha_bar_T | small object | large object |\n|---|---:|---:|---:|")
    for name, params in SCHEDULES.items():
        abar_T = float(NoiseSchedule(**params).alphas_cumprod[-1])
        print(f"| {name} | {abar_T:.2g} | {table[(name, 'small')]:.3g} | {table[(name, 'large')]:.3g} |")
    hidden = hidden_from(curves)
    print("\n| schedule | object | SNR < 4 from t | SNR < 1 from t |\n|---|---|---:|---:|")
    for name in SCHEDULES:
        for size in SIZES:
            cells = ["never" if hidden[(name, size, th)] is None else str(hidden[(name, size, th)]) for th in (4.0, 1.0)]
            print(f"| {name} | {size} | {cells[0]} | {cells[1]} |")
    return {"snr_at_T": table, "hidden_from": hidden}


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
