"""A folder of captioned images, for training either stage on your own pictures.

Layout (Hugging Face ``imagefolder`` convention, searched recursively)::

    root/
      metadata.jsonl        {"file_name": "cats/001.png", "text": "a cat on a sofa"}  (one JSON object a line)
      cats/001.png
      dogs/002.jpg
      dogs/002.txt          sidecar caption, same stem as the image

``file_name`` is relative to the directory holding that ``metadata.jsonl`` (there may be one per sub-folder).
The caption field is ``"text"`` (``"caption"`` is accepted too).

Problems with the *folder* (no images, an image without a caption, a metadata line that is not JSON or names a
missing file) raise ``ValueError`` at construction, naming the path and line, before any training starts.
Problems with an *image* (corrupt, truncated, unreadable) are not fatal: the file is logged once, recorded in
``skipped_paths`` and the next good item is returned instead (wrap-around); only if every file fails is an error
raised. With ``verify=True`` every image is checked with ``PIL.Image.verify`` up front and bad ones are dropped.
Note that with a multi-process ``DataLoader`` each worker keeps its own ``skipped_paths``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp"})
METADATA_FILE = "metadata.jsonl"
CAPTION_FIELDS = ("text", "caption")

# What PIL raises for a bad file: UnidentifiedImageError is an OSError; truncated data can raise
# OSError, SyntaxError (bad PNG chunks), ValueError, or struct/zlib errors during decode.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _list_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _read_metadata(root: Path) -> dict[Path, str]:
    """Captions from every ``metadata.jsonl`` under ``root``: ``{absolute image path: caption}``."""
    captions: dict[Path, str] = {}
    where: dict[Path, str] = {}
    for meta in sorted(root.rglob(METADATA_FILE)):
        with open(meta, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                loc = f"{meta}:{number}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{loc}: malformed JSON line in {METADATA_FILE} ({error.msg}): {line.strip()[:200]!r}"
                    ) from error
                if not isinstance(entry, dict) or "file_name" not in entry:
                    raise ValueError(
                        f"{loc}: expected a JSON object with a 'file_name' key, got {line.strip()[:200]!r}"
                    )
                field = next((k for k in CAPTION_FIELDS if k in entry), None)
                if field is None:
                    raise ValueError(
                        f"{loc}: entry for {entry['file_name']!r} has no caption field (one of {CAPTION_FIELDS})"
                    )
                caption = entry[field]
                if not isinstance(caption, str):
                    raise ValueError(
                        f"{loc}: caption of {entry['file_name']!r} must be a string, got {type(caption).__name__}"
                    )
                path = (meta.parent / str(entry["file_name"])).resolve()
                if not path.is_file():
                    raise ValueError(f"{loc}: file_name {entry['file_name']!r} does not exist ({path})")
                if path in where:
                    raise ValueError(f"{loc}: duplicate entry for {entry['file_name']!r} (first at {where[path]})")
                captions[path] = caption
                where[path] = loc
    return captions


def resize_and_crop(image: Image.Image, size: int, crop: str = "center", flip: bool = False,
                    generator: Optional[torch.Generator] = None) -> Image.Image:
    """Shorter side to ``size`` (bicubic, antialiased when shrinking), then a ``size x size`` center/random crop
    and, if ``flip``, a horizontal flip with probability 1/2. Randomness comes from torch's RNG, which a
    ``DataLoader`` seeds differently in every worker."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    if crop == "center":
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left = int(torch.randint(0, new_w - size + 1, (), generator=generator))
        top = int(torch.randint(0, new_h - size + 1, (), generator=generator))
    image = image.crop((left, top, left + size, top + size))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``float32 [3, H, W]`` in ``[-1, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0)


class CaptionedImageFolder(Dataset):
    """Captioned images under ``root``.

    ``item = {image_key: float32 [3, size, size] in [-1, 1], caption_key: str}``.

    Args:
        root: folder, searched recursively for .png/.jpg/.jpeg/.webp files.
        size: output side in pixels (shorter side resized to it, then cropped square).
        crop: ``"center"`` or ``"random"``.
        flip: random horizontal flip (p = 0.5).
        caption_source: ``"metadata"`` (``metadata.jsonl`` only), ``"txt"`` (sidecar ``.txt`` only), ``"auto"``
            (metadata entry if there is one, else the sidecar) or ``"none"`` (images only, every caption ``""``:
            for autoencoder training, which needs no text).
        verify: check every image with ``PIL.Image.verify`` at construction, dropping (and counting) bad ones.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 64,
        crop: str = "center",
        flip: bool = False,
        caption_source: str = "auto",
        image_key: str = "image",
        caption_key: str = "caption",
        verify: bool = False,
    ):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if caption_source not in ("auto", "metadata", "txt", "none"):
            raise ValueError(f"caption_source must be 'auto', 'metadata', 'txt' or 'none', got {caption_source!r}")
        if int(size) != size or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if image_key == caption_key:
            raise ValueError(f"image_key and caption_key must differ, both are {image_key!r}")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found (or not a directory): {self.root}")
        self.size = int(size)
        self.crop = crop
        self.flip = bool(flip)
        self.caption_source = caption_source
        self.image_key = image_key
        self.caption_key = caption_key
        self.skipped_paths: list[str] = []
        self._bad: set[int] = set()

        images = _list_images(self.root)
        if not images:
            raise ValueError(
                f"no images found under {self.root} (looked recursively for {sorted(IMAGE_EXTENSIONS)})"
            )
        metadata: dict[Path, str] = {}
        if caption_source in ("auto", "metadata"):
            metadata = _read_metadata(self.root)
            if caption_source == "metadata" and not metadata:
                raise ValueError(f"caption_source='metadata' but no {METADATA_FILE} with entries under {self.root}")
        self.samples: list[tuple[str, str]] = []
        missing: list[str] = []
        for path in images:
            caption = metadata.get(path.resolve())
            if caption_source == "none":
                caption = ""
            if caption is None and caption_source in ("auto", "txt"):
                sidecar = path.with_suffix(".txt")
                if sidecar.is_file():
                    caption = sidecar.read_text(encoding="utf-8").strip()
            if caption is None:
                missing.append(str(path))
            else:
                self.samples.append((str(path), caption))
        if missing:
            how = {"auto": f"a {METADATA_FILE} entry or a sidecar .txt", "metadata": f"a {METADATA_FILE} entry",
                   "txt": "a sidecar .txt"}[caption_source]
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} image(s) under {self.root} have no caption (need {how}): {shown}")

        if verify:
            good = []
            for path, caption in self.samples:
                try:
                    with Image.open(path) as image:
                        image.verify()
                except _IMAGE_ERRORS as error:
                    self._record_skip(path, error)
                else:
                    good.append((path, caption))
            if not good:
                raise ValueError(f"all {len(self.samples)} images under {self.root} failed verification")
            self.samples = good

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_paths)

    def __len__(self) -> int:
        return len(self.samples)

    def _record_skip(self, path: str, error: BaseException) -> None:
        self.skipped_paths.append(path)
        logger.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)

    def load(self, index: int) -> torch.Tensor:
        """Read, resize, crop and (maybe) flip image ``index``; raises what PIL raises for a bad file."""
        path = self.samples[index][0]
        with Image.open(path) as image:
            image.load()
            image = image.convert("RGB")
        image = resize_and_crop(image, self.size, self.crop, self.flip)
        return pil_to_tensor(image)

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for CaptionedImageFolder of length {n}")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                image = self.load(j)
            except _IMAGE_ERRORS as error:
                self._bad.add(j)
                self._record_skip(self.samples[j][0], error)
                continue
            return {self.image_key: image, self.caption_key: self.samples[j][1]}
        raise RuntimeError(f"every image under {self.root} failed to load ({len(self._bad)} skipped)")

    def __repr__(self) -> str:
        return (f"CaptionedImageFolder(root={str(self.root)!r}, n={len(self)}, size={self.size}, crop={self.crop!r}, "
                f"flip={self.flip})")
