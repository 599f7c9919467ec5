"""What ``--data PATH`` names: a captioned image folder, WebDataset tar shards, or a latent cache.

* a latent cache: a folder holding :data:`CACHE_MANIFEST` (written by ``ldm cache-latents``);
* WebDataset shards: a brace pattern (``shards/train-{000000..000099}.tar``), one ``.tar`` file, a folder whose files
  are ``.tar`` shards, or a URL the ``webdataset`` library opens (``https://``, ``s3://``...; ``pipe:`` runs a shell
  command, so :mod:`ldm.data.shards` refuses it unless ``LDM_ALLOW_PIPE_URLS=1``);
* anything else that is a folder: a captioned image folder (:class:`ldm.data.image_folder.CaptionedImageFolder`).

:func:`dataset_node` turns the path into the ``{target, params}`` node the training scripts build their loaders from,
so the choice is recorded in the run's ``config.yaml`` like any other dataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_MANIFEST = "latent_cache.json"
FOLDER_TARGET = "ldm.data.image_folder.CaptionedImageFolder"
SHARDS_TARGET = "ldm.data.shards.ShardDataset"
CACHE_TARGET = "ldm.data.latent_cache.LatentCacheDataset"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # s3:, gs:, http(s):, pipe:, file:


def data_kind(path: str | os.PathLike) -> str:
    """``"cache"``, ``"shards"`` or ``"folder"`` for ``path`` (see the module docstring); ``FileNotFoundError``
    naming the path when it is none of them."""
    text = os.fspath(path)
    local = Path(text)
    if local.is_dir():
        if (local / CACHE_MANIFEST).is_file():
            return "cache"
        entries = [p for p in local.iterdir() if p.is_file() and not p.name.startswith(".")]
        if entries and all(p.suffix == ".tar" for p in entries):
            return "shards"
        return "folder"
    if "{" in text or text.endswith(".tar") or (_URL.match(text) and not re.match(r"^[a-zA-Z]:[\\/]", text)):
        if text.endswith(".tar") and "{" not in text and not _URL.match(text) and not local.is_file():
            raise FileNotFoundError(f"--data: shard not found: {text}")
        return "shards"
    raise FileNotFoundError(f"--data: not a folder, a .tar shard, a brace pattern of shards or a URL: {text}")


def shard_urls(path: str | os.PathLike) -> str | list[str]:
    """The ``urls`` argument for ``webdataset``: a folder of shards becomes its sorted ``.tar`` files."""
    local = Path(os.fspath(path))
    if local.is_dir():
        return [str(p) for p in sorted(local.glob("*.tar"))]
    return os.fspath(path)


SHUFFLE_BUFFER = 1000  # samples: shards are read in order, a training stream is shuffled through this buffer


def dataset_node(path: str | os.PathLike, size: int, crop: str = "random", flip: bool = False,
                 caption_source: str = "auto", seed: int = 0, epoch_length: int | None = None) -> dict:
    """``{target, params}`` of the dataset ``--data path`` names, producing ``size x size`` images (or their
    cached latents). ``caption_source="none"`` (autoencoder training) reads no captions. Shards: a training stream
    (``crop="random"``) is shuffled (shard order per epoch and a :data:`SHUFFLE_BUFFER`); ``epoch_length`` is the
    samples per process and epoch (needed with several processes, so that all run the same number of steps)."""
    kind = data_kind(path)
    if kind == "cache":
        return {"target": CACHE_TARGET, "params": {"root": os.fspath(path)}}
    if kind == "shards":
        return {"target": SHARDS_TARGET,
                "params": {"urls": shard_urls(path), "size": int(size), "crop": crop, "flip": bool(flip),
                           "caption_source": caption_source, "seed": int(seed), "epoch_length": epoch_length,
                           "shuffle_buffer": SHUFFLE_BUFFER if crop == "random" else 0}}
    return {"target": FOLDER_TARGET,
            "params": {"root": os.fspath(path), "size": int(size), "crop": crop, "flip": bool(flip),
                       "caption_source": caption_source}}


SPLIT_TARGET = "ldm.data.split.HeldOutSplit"
VALIDATION_FOLDERS = ("validation", "val")


def train_val_nodes(path: str | os.PathLike, size: int, val_fraction: float = 0.02, seed: int = 0,
                    caption_source: str = "auto", flip: bool = False,
                    epoch_length: int | None = None) -> tuple[dict, dict | None, str]:
    """``(train node, validation node or None, how the validation set was chosen)`` for ``--data path``.

    The data's own split when it has one (a folder with ``train/`` and ``validation/`` or ``val/``); else a
    held-out ``val_fraction`` of it, fixed by ``seed`` (:class:`ldm.data.split.HeldOutSplit`); shards, which are
    streams, get no validation set (``val_fraction`` 0 turns it off for the others too). Training items are random
    crops (and flips when ``flip``), validation items center crops.
    """
    root = Path(os.fspath(path))
    if root.is_dir() and (root / "train").is_dir() and data_kind(root) == "folder":
        val = next((root / name for name in VALIDATION_FOLDERS if (root / name).is_dir()), None)
        train = dataset_node(root / "train", size, "random", flip, caption_source)
        if val is not None:
            return train, dataset_node(val, size, "center", False, caption_source), f"the data's own split ({val})"
        root = root / "train"
    kind = data_kind(root)
    if kind == "shards" or not val_fraction:
        reason = "shards are streams" if kind == "shards" else "val_fraction is 0"
        train = dataset_node(root, size, "random", flip, caption_source, seed, epoch_length)
        return train, None, f"none ({reason})"
    train = dataset_node(root, size, "random", flip, caption_source)
    val = dataset_node(root, size, "center", False, caption_source)
    if kind == "cache":
        val = train  # cached latents have one crop
    split = {"fraction": float(val_fraction), "seed": int(seed)}
    return ({"target": SPLIT_TARGET, "params": {"dataset": train, "part": "train", **split}},
            {"target": SPLIT_TARGET, "params": {"dataset": val, "part": "validation", **split}},
            f"{val_fraction:.1%} of the data held out (seed {seed})")
