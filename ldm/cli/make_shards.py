"""Write a captioned image folder as WebDataset tar shards, for training with ``--data 'DIR/train-{...}.tar'``.

    ldm make-shards --data images/ --out shards/ [--shard-size 1000] [--prefix train] [--caption-source auto]

The folder is read as ``--data DIR`` reads it (``ldm.data.image_folder.CaptionedImageFolder``: images found
recursively, captions from ``metadata.jsonl`` or sidecar ``.txt`` files, a missing caption fails before anything is
written). Each image becomes one sample of ``--shard-size`` per shard, ``DIR/<prefix>-000000.tar, ...``::

    000000000.png    the original file's bytes (not re-encoded; .jpeg is stored as jpg)
    000000000.txt    the caption, UTF-8
    000000000.json   {"caption": "...", "file_name": "cats/001.png"}   (path relative to --data)

Keys count up over the whole folder in its sorted order. A shard is written as ``<name>.tar.partial`` and renamed
when complete, so an interrupted run leaves no shard that looks whole. An ``--out`` folder that already holds
``.tar`` files is refused. Prints, and returns, the brace pattern covering the shards written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from pathlib import Path

from tqdm.auto import tqdm
from webdataset import ShardWriter

from ldm.cli import run
from ldm.data.image_folder import CaptionedImageFolder
from ldm.threads import add_threads_argument, configure_threads

log = logging.getLogger("make_shards")

PARTIAL = ".partial"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="captioned image folder (as --data of the training commands)")
    parser.add_argument("--out", required=True, help="folder for the shards (created; must hold no .tar files)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--prefix", default="train", help="shard file names: <prefix>-000000.tar, ... (default train)")
    parser.add_argument("--caption-source", default="auto", choices=["auto", "metadata", "txt", "none"],
                        help="where captions come from, as for the image folder (none: every caption empty)")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Stop with one line ``error: ...`` on a bad option or an ``--out`` that already holds shards."""
    if args.shard_size < 1:
        raise SystemExit(f"error: --shard-size must be >= 1, got {args.shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.prefix):
        raise SystemExit(f"error: --prefix must be letters, digits, '-', '_' or '.', got {args.prefix!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder")
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing:
        raise SystemExit(f"error: --out {out} already holds {len(existing)} .tar file(s) (e.g. {existing[0].name}); "
                         f"write the shards to a new folder, e.g. --out {out.as_posix().rstrip('/')}-2")


def shard_pattern(out: str, prefix: str, num_shards: int, width: int) -> str:
    """The brace pattern covering shards ``0 .. num_shards - 1``, e.g. ``out/train-{000000..000003}.tar``."""
    return os.path.join(out, f"{prefix}-{{{0:0{width}d}..{num_shards - 1:0{width}d}}}.tar")


def image_member(path: str) -> str:
    """The member extension an image file is stored under: its own, lower-cased, ``jpeg`` as ``jpg``."""
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def sample_record(key: str, path: str, caption: str, root: Path) -> dict:
    """One sample for ``TarWriter`` (every value bytes, so nothing is re-encoded)."""
    file_name = Path(path).relative_to(root).as_posix()
    return {
        "__key__": key,
        image_member(path): Path(path).read_bytes(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps({"caption": caption, "file_name": file_name}, ensure_ascii=False).encode("utf-8"),
    }


def finish_shard(partial: str) -> None:
    """``ShardWriter``'s ``post`` hook: a closed shard gets its final name."""
    os.replace(partial, partial[:-len(PARTIAL)])


def main(argv=None) -> str:
    """Returns the brace pattern of the shards written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configure_threads(args.threads)
    check_arguments(args)
    folder = CaptionedImageFolder(args.data, caption_source=args.caption_source)
    samples = folder.samples
    num_shards = math.ceil(len(samples) / args.shard_size)
    width = max(6, len(str(num_shards - 1)))
    key_width = max(9, len(str(len(samples) - 1)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # ShardWriter fills the shard number in with %; a % in the folder name must not be read as a format.
    name = os.path.join(args.out.replace("%", "%%"), f"{args.prefix}-%0{width}d.tar{PARTIAL}")
    writer = ShardWriter(name, maxcount=args.shard_size, maxsize=float("inf"), post=finish_shard, verbose=0,
                         encoder=False)
    try:
        for index, (path, caption) in enumerate(tqdm(samples, desc="make-shards", unit="image",
                                                     disable=args.no_progress)):
            writer.write(sample_record(f"{index:0{key_width}d}", path, caption, folder.root))
    except BaseException:
        writer.post = None  # the open shard is incomplete: it keeps its .partial name
        writer.close()
        raise
    writer.close()
    pattern = shard_pattern(args.out, args.prefix, num_shards, width)
    print(f"wrote {len(samples)} samples from {folder.root} in {num_shards} shard(s) of up to {args.shard_size}: "
          f"{pattern}")
    print(f"train with: --data '{pattern}'")
    return pattern


if __name__ == "__main__":
    run(main)
