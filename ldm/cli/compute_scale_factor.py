"""Measure the latent scale factor of trained autoencoder weights and store it in their metadata.

    python scripts/compute_scale_factor.py --ckpt runs/<run>/autoencoder.safetensors [--num-batches N]
        [--batch-size B] [--config YAML | --data DIR] [--seed S] [--dry-run]

As CompVis' ``scale_by_std``: encode training images, draw posterior samples ``z``, and take
``scale_factor = 1 / std(z)`` over all latent values of ``N`` batches. The latent mean and std are printed and
the file's metadata gets ``scale_factor``, ``latent_mean`` and ``latent_std`` (rewritten atomically), which the
diffusion stage reads through ``autoencoder.load_autoencoder`` instead of a hard-coded 0.18215.

The images come from the ``data_config`` the training script stored in the weights, or from ``--config``'s
``data`` section, or from an image folder (``--data``).
"""

from __future__ import annotations

import argparse
import os


import torch

from autoencoder.io import load_autoencoder, read_data_config, write_scale_factor
from autoencoder.scale import latent_statistics
from ldm.cli import run
from ldm.threads import add_threads_argument, configure_threads
from ldm.training import build_dataloader
from ldm.util import add_allow_target_argument, load_config
from ldm.cli.train_autoencoder import data_section, image_folder_nodes


def dataset_node(ckpt: str, split: str, config_path: str | None, data_dir: str | None, size: int) -> tuple[dict, int]:
    """``(dataset node, batch size from the config or 16)`` for ``split`` ("train" or "validation")."""
    if data_dir:
        nodes = image_folder_nodes(data_dir, size)
        # shards (or --val-fraction 0) have no validation part: the training data, as for a config without one
        return nodes[split] or nodes["train"], 16
    if config_path:
        data = data_section(load_config(config_path).get("data"))
        source = f"{config_path}: data"
    else:
        data = data_section(read_data_config(ckpt) or {})
        source = f"{ckpt}: metadata data_config"
    node = data.get(split) or (data.get("train") if split == "validation" else None)
    if not node:
        raise SystemExit(
            f"error: no '{split}' dataset in {source}; pass --config YAML (with a data section) or --data DIR"
        )
    return node, int(data.get("batch_size", 16))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="autoencoder .safetensors written by train_autoencoder.py")
    parser.add_argument("--num-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the data config's batch_size")
    parser.add_argument("--config", default=None, help="take the data from this config's data section")
    parser.add_argument("--data", default=None, help="take the data from this image folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="print the statistics without writing them")
    add_allow_target_argument(parser)
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> float:
    """Returns the scale factor (also written into ``--ckpt`` unless ``--dry-run``)."""
    args = parse_args(argv)
    configure_threads(args.threads)
    if args.num_batches < 1:
        raise SystemExit("error: --num-batches must be >= 1")
    model, old = load_autoencoder(args.ckpt, require_scale_factor=False)
    size = int(model.ddconfig["resolution"])
    node, batch_size = dataset_node(args.ckpt, "train", args.config, args.data, size)
    loader = build_dataloader(node, args.batch_size or batch_size, shuffle=True, path="data.train", seed=args.seed)
    stats = latent_statistics(model, loader, num_batches=args.num_batches,
                              generator=torch.Generator().manual_seed(args.seed))
    print(f"latent mean {stats.mean:.6f}")
    print(f"latent std  {stats.std:.6f}")
    print(f"scale_factor = 1/std = {stats.scale_factor:.6f}  ({stats.count} latent values, "
          f"{min(args.num_batches, len(loader))} batches; previously {old})")
    if not args.dry_run:
        write_scale_factor(args.ckpt, stats.scale_factor, latent_mean=stats.mean, latent_std=stats.std)
        print(f"written to {args.ckpt}")
    return stats.scale_factor


if __name__ == "__main__":
    run(main)  # a user error: one line "error: ..." and exit 2 (LDM_DEBUG=1 or --debug: the traceback)
