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
missing file, a caption file that is not valid UTF-8) raise ``ValueError`` at construction, naming the path and
line, before any training starts. A UTF-8 byte-order mark at the start of a caption file is dropped.
Problems with an *image* (corrupt, truncated, unreadable) are not fatal: the file is logged once, counted and the
next good item is returned instead (wrap-around); only if every file fails is an error raised. With ``verify=True``
every image is checked with ``PIL.Image.verify`` up front and bad ones are dropped (and counted).

Skipped images are reported by ``num_skipped`` (int), ``skipped_paths`` (list of str) and ``skip_summary()`` (one
line for a log or an end-of-run summary). Skips made inside ``DataLoader`` worker processes are included: each
sample has a flag in a shared-memory tensor that the workers write and the main process reads. The count is per
dataset object, so with several training processes (DDP ranks) each rank reports its own.

Decoding, so that no image trains silently wrong:

* the EXIF orientation tag is applied (``ImageOps.exif_transpose``) before any resize or crop;
* transparent images (RGBA, LA, palette or grey/RGB with a transparency key) are composited onto ``background``
  (white by default) rather than exposing whatever colour hides under fully transparent pixels;
* 16-bit greyscale PNGs (PIL modes ``I;16*`` and ``I``) are scaled by 1/65535 and kept in float through the resize,
  instead of being clipped at 255 (which turned everything above 0.4% grey into white). PIL opens 16-bit RGB PNGs
  as 8-bit RGB itself. Mode ``F`` (float) is taken to be in [0, 1].

Aspect-ratio buckets (``buckets=True``, see :mod:`ldm.data.buckets`): instead of a ``size x size`` crop, each image
is scaled to cover the bucket of its aspect ratio (about ``size ** 2`` pixels) and cropped to it. The sizes come
from the file headers at construction (oriented as displayed); a file whose header cannot be read is skipped
there. Batches must then come from one bucket each: use ``BucketBatchSampler(dataset.bucket_ids, batch_size)`` as
the loader's ``batch_sampler``. An image that fails at load time is replaced by the next good one of the same
bucket (else by any good image, cropped to that bucket's shape), so that a batch always stacks.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import ExifTags, Image, ImageColor, ImageOps
from torch.utils.data import Dataset

from ldm.data.buckets import assign_bucket, make_buckets

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp"})
METADATA_FILE = "metadata.jsonl"
CAPTION_FIELDS = ("text", "caption")

# What PIL raises for a bad file: UnidentifiedImageError is an OSError; truncated data can raise
# OSError, SyntaxError (bad PNG chunks), ValueError, or struct/zlib errors during decode.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)

# Modes whose pixels carry an alpha channel (lower-case "a": premultiplied).
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# High-bit-depth greyscale: a 16-bit PNG opens as "I;16" (or "I" in older Pillow), values 0..65535.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# EXIF orientations that display the stored pixels turned by 90 or 270 degrees (width and height swap).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def parse_background(background) -> tuple[int, int, int]:
    """``(r, g, b)`` ints in 0..255 from a 3-sequence (list, tuple, OmegaConf list) or a colour name/hex string
    (anything ``PIL.ImageColor.getrgb`` knows: ``"white"``, ``"black"``, ``"#808080"``)."""
    if isinstance(background, str):
        try:
            rgb = ImageColor.getrgb(background)
        except ValueError as error:
            raise ValueError(f"background: unknown colour {background!r}") from error
    else:
        try:
            rgb = tuple(background)
        except TypeError as error:
            raise ValueError(f"background must be [r, g, b] or a colour name, got {background!r}") from error
    ok = len(rgb) == 3 and all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb)
    if not ok:
        raise ValueError(f"background must be three ints in 0..255 (or a colour name), got {background!r}")
    return tuple(int(c) for c in rgb)


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any image with alpha -> ``RGB`` over a solid ``background``."""
    base = Image.new("RGBA", image.size, (*background, 255))
    return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")


def decode_image(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A freshly opened, loaded PIL image (any mode) -> upright ``RGB`` (8-bit), or ``F`` (greyscale float in
    [0, 1]) for 16-bit/float sources so that their precision survives the resize. ``pil_to_tensor`` takes either.

    Order matters: orientation first, so that the crop is taken from the picture the photographer saw; alpha
    compositing before the resize, so that hidden colours under transparent pixels cannot bleed into the edges."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a malformed EXIF block: count the file as unreadable rather than guess
        raise OSError(f"cannot apply EXIF orientation ({type(error).__name__}: {error})") from error
    if image.mode in _WIDE_GREY_MODES or image.mode == "F":
        raw = np.asarray(image)
        if image.mode == "F":
            grey = np.nan_to_num(raw.astype(np.float32), nan=0.0)
        else:
            grey = raw.astype(np.float32) / 65535.0
        grey = np.clip(grey, 0.0, 1.0)
        key = image.info.get("transparency")
        if isinstance(key, int) and image.mode != "F" and (raw == key).any():
            # A tRNS key on a 16-bit grey PNG (rare): composite in 8 bits, as precision matters less than the
            # transparent pixels not training as grey.
            grey8 = np.rint(grey * 255).astype(np.uint8)
            alpha = np.where(raw == key, 0, 255).astype(np.uint8)
            return _composite(Image.fromarray(np.stack([grey8, grey8, grey8, alpha], -1)), background)
        return Image.fromarray(grey.astype(np.float32))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite(image, background)
    return image.convert("RGB")


def _list_images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _read_metadata(root: Path) -> dict[Path, str]:
    """Captions from every ``metadata.jsonl`` under ``root``: ``{absolute image path: caption}``."""
    captions: dict[Path, str] = {}
    where: dict[Path, str] = {}
    for meta in sorted(root.rglob(METADATA_FILE)):
        # Bytes, decoded a line at a time, so that an encoding error can name its line.
        with open(meta, "rb") as f:
            for number, raw in enumerate(f, start=1):
                loc = f"{meta}:{number}"
                line = _decode_utf8(raw, loc, bom=number == 1)
                if not line.strip():
                    continue
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


def _decode_utf8(data: bytes, where: str, bom: bool = True) -> str:
    """``data`` as UTF-8 (a leading byte-order mark dropped if ``bom``); ``ValueError`` naming ``where`` if invalid."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start:error.end]
        raise ValueError(
            f"{where}: not valid UTF-8 (byte {bad[:1].hex()} at offset {error.start}, near "
            f"{data[max(0, error.start - 20):error.end + 20]!r}); re-save the file as UTF-8"
        ) from error


def resize_and_crop(image: Image.Image, size: int | tuple[int, int], crop: str = "center", flip: bool = False,
                    generator: Optional[torch.Generator] = None) -> Image.Image:
    """Scale to cover ``size`` (bicubic, antialiased when shrinking), then a center/random crop to it and, if
    ``flip``, a horizontal flip with probability 1/2. ``size`` is a side (a square: the shorter side goes to it) or
    a ``(width, height)`` bucket. Randomness comes from torch's RNG, which a ``DataLoader`` seeds differently in
    every worker."""
    out_w, out_h = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    w, h = image.size
    # For a square this is size / min(w, h): the covering scale is set by the side that fits tighter.
    scale = max(out_w / w, out_h / h)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    if crop == "center":
        left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    else:
        left = int(torch.randint(0, new_w - out_w + 1, (), generator=generator))
        top = int(torch.randint(0, new_h - out_h + 1, (), generator=generator))
    image = image.crop((left, top, left + out_w, top + out_h))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file as displayed, from its header alone: swapped when the EXIF orientation
    turns the picture by 90 or 270 degrees (as ``decode_image`` will). Raises what PIL raises for a bad header, and
    ``OSError`` for a malformed EXIF block (which ``decode_image`` would refuse too)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "PNG" and "exif" not in image.info:
            # PIL's PNG getexif decodes every pixel to look for an eXIf chunk after them; writers put it before.
            # One missed only costs the crop's fit: loading still crops to the assigned bucket's shape.
            return width, height
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception as error:
            raise OSError(f"cannot read the EXIF orientation ({type(error).__name__}: {error})") from error
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def image_options(size, crop: str, flip: bool, caption_source: str, caption_sources: tuple[str, ...], image_key: str,
                  caption_key: str, background, reserved_keys: tuple[str, ...] = ()) -> dict:
    """The checked decoding options a captioned-image dataset keeps as attributes (``size``, ``crop``, ``flip``,
    ``caption_source``, ``image_key``, ``caption_key``, ``background``); ``ValueError`` naming a bad one."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if caption_source not in caption_sources:
        raise ValueError(f"caption_source must be one of {caption_sources}, got {caption_source!r}")
    if int(size) != size or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    keys = (image_key, caption_key, *reserved_keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"the item keys {keys} must all differ")
    return {"size": int(size), "crop": crop, "flip": bool(flip), "caption_source": caption_source,
            "image_key": image_key, "caption_key": caption_key, "background": parse_background(background)}


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``float32 [3, H, W]`` in ``[-1, 1]``. Mode ``F`` (``decode_image``'s 16-bit path) is grey in
    [0, 1], repeated over the 3 channels; any other mode goes through ``convert("RGB")`` (8-bit)."""
    if image.mode == "F":
        # Bicubic resampling overshoots near edges; uint8 clips that for free, float needs the clamp.
        grey = torch.from_numpy(np.array(image, dtype=np.float32)).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0)


class CaptionedImageFolder(Dataset):
    """Captioned images under ``root``.

    ``item = {image_key: float32 [3, size, size] in [-1, 1], caption_key: str}``; with ``buckets=True``,
    ``[3, h, w]`` with ``(w, h) = bucket_sizes[bucket_ids[index]]``.

    Args:
        root: folder, searched recursively for .png/.jpg/.jpeg/.webp files.
        size: output side in pixels (shorter side resized to it, then cropped square); with ``buckets``, the
            buckets hold at most ``size ** 2`` pixels.
        crop: ``"center"`` or ``"random"``.
        flip: random horizontal flip (p = 0.5).
        caption_source: ``"metadata"`` (``metadata.jsonl`` only), ``"txt"`` (sidecar ``.txt`` only), ``"auto"``
            (metadata entry if there is one, else the sidecar) or ``"none"`` (images only, every caption ``""``:
            for autoencoder training, which needs no text).
        verify: check every image with ``PIL.Image.verify`` at construction, dropping (and counting) bad ones.
        background: colour that transparent pixels are composited onto: ``[r, g, b]`` (ints 0..255) or a colour
            name / hex string (``"white"``, ``"black"``, ``"#808080"``). Default white, as a browser or image
            viewer shows a transparent PNG.
        buckets: aspect-ratio buckets (see the module docstring): ``bucket_sizes`` lists the ``(width, height)``
            shapes, ``bucket_ids`` the bucket of each index.
        bucket_step: bucket sides are multiples of this (64: latents of an f8 autoencoder stay multiples of 8).
        min_bucket_size, max_bucket_size: bounds of a bucket side, multiples of ``bucket_step``; ``None``: half and
            twice ``size`` (rounded to the step), kohya's 256 and 1024 at 512.

    Skipped (unreadable) images: ``num_skipped``, ``skipped_paths``, ``skip_summary()``; they include skips made
    in ``DataLoader`` worker processes (see the module docstring).
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
        background=(255, 255, 255),
        buckets: bool = False,
        bucket_step: int = 64,
        min_bucket_size: Optional[int] = None,
        max_bucket_size: Optional[int] = None,
    ):
        vars(self).update(image_options(size, crop, flip, caption_source, ("auto", "metadata", "txt", "none"),
                                        image_key, caption_key, background))
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found (or not a directory): {self.root}")
        # Dropped by verify=True at construction (so no longer in self.samples); load-time skips are flags below.
        self._dropped: list[str] = []

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
        undecodable: list[str] = []
        for path in images:
            caption = metadata.get(path.resolve())
            if caption_source == "none":
                caption = ""
            if caption is None and caption_source in ("auto", "txt"):
                sidecar = path.with_suffix(".txt")
                if sidecar.is_file():
                    try:
                        caption = _decode_utf8(sidecar.read_bytes(), str(sidecar)).strip()
                    except ValueError as error:
                        undecodable.append(str(error))
                        continue
            if caption is None:
                missing.append(str(path))
            else:
                self.samples.append((str(path), caption))
        if missing:
            how = {"auto": f"a {METADATA_FILE} entry or a sidecar .txt", "metadata": f"a {METADATA_FILE} entry",
                   "txt": "a sidecar .txt"}[caption_source]
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} image(s) under {self.root} have no caption (need {how}): {shown}")
        if undecodable:
            # All of them at once: a folder of captions saved in another encoding usually has many.
            shown = "; ".join(undecodable[:5]) + (f" (and {len(undecodable) - 5} more)" if len(undecodable) > 5 else "")
            raise ValueError(f"{len(undecodable)} caption file(s) under {self.root} are not valid UTF-8: {shown}")

        if verify:
            good = []
            for path, caption in self.samples:
                try:
                    with Image.open(path) as image:
                        image.verify()
                except _IMAGE_ERRORS as error:
                    self._dropped.append(path)
                    self._log_skip(path, error)
                else:
                    good.append((path, caption))
            if not good:
                raise ValueError(f"all {len(self.samples)} images under {self.root} failed verification")
            self.samples = good
        self.buckets = bool(buckets)
        self.bucket_sizes: list[tuple[int, int]] = []
        self.bucket_ids: list[int] = []
        if self.buckets:
            self._assign_buckets(bucket_step, min_bucket_size, max_bucket_size)
        # One flag per sample, 1 = failed to load. Shared memory, so that a flag set in a DataLoader worker is seen
        # by the main process (for the count) and by the other workers (which then skip the file without
        # re-reading it or logging it again). Fork inherits the mapping; spawn pickles it as a shared handle.
        self._skip_flags = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def _assign_buckets(self, step, min_size, max_size) -> None:
        """Fill ``bucket_sizes`` and ``bucket_ids`` from the image headers, dropping (and counting) the files whose
        header cannot be read."""
        try:
            self.bucket_sizes = make_buckets(self.size, step, min_size, max_size)
        except ValueError as error:
            raise ValueError(f"CaptionedImageFolder(size={self.size}, bucket_step={step!r}, min_bucket_size="
                             f"{min_size!r}, max_bucket_size={max_size!r}): {error}") from error
        kept = []
        for path, caption in self.samples:
            try:
                width, height = displayed_size(path)
            except _IMAGE_ERRORS as error:
                self._dropped.append(path)
                self._log_skip(path, error)
                continue
            kept.append((path, caption))
            self.bucket_ids.append(assign_bucket(width, height, self.bucket_sizes))
        if not kept:
            raise ValueError(f"no image header under {self.root} could be read ({len(self.samples)} tried)")
        self.samples = kept
        members: dict[int, list[int]] = {}
        # Each index's place among its bucket's members, so that finding a replacement costs no search.
        self._bucket_position: list[int] = []
        for index, bucket in enumerate(self.bucket_ids):
            self._bucket_position.append(len(members.setdefault(bucket, [])))
            members[bucket].append(index)
        self._bucket_members = members
        logger.info("%d images under %s in %d buckets: %s", len(kept), self.root, len(members),
                    ", ".join(f"{self.bucket_sizes[b][0]}x{self.bucket_sizes[b][1]}: {len(members[b])}"
                              for b in sorted(members)))

    def output_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of item ``index``: its bucket's shape, or ``(size, size)``."""
        if self.buckets:
            return self.bucket_sizes[self.bucket_ids[index]]
        return self.size, self.size

    def _candidates(self, index: int) -> Iterator[int]:
        """Indices to try for item ``index``, in order: itself, then its replacements if it fails to load -- the
        next ones (wrap-around), those of its own bucket first so that the replacement keeps the aspect ratio."""
        n = len(self.samples)
        if not self.buckets:
            yield from ((index + step) % n for step in range(n))
            return
        members = self._bucket_members[self.bucket_ids[index]]
        start = self._bucket_position[index]
        yield from (members[(start + step) % len(members)] for step in range(len(members)))
        yield from (j for j in ((index + step) % n for step in range(1, n))
                    if self.bucket_ids[j] != self.bucket_ids[index])

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the images skipped so far as unreadable (``verify=True`` drops first, then load failures in
        sample order), including those hit in ``DataLoader`` workers."""
        flagged = torch.nonzero(self._skip_flags).flatten().tolist()
        return self._dropped + [self.samples[i][0] for i in flagged]

    @property
    def num_skipped(self) -> int:
        """How many images have been skipped so far as unreadable (``len(skipped_paths)``)."""
        return len(self._dropped) + int(self._skip_flags.sum())

    def skip_summary(self, show: int = 3) -> str:
        """One line for a log or an end-of-run summary, e.g. ``"skipped 2 of 40 images under /data as unreadable
        (see the warnings for why): cats/a.png, b.png"`` (first ``show`` paths, relative to ``root``), or
        ``"no images skipped (40 under /data)"``. Only files read so far count: an image that no epoch has
        reached yet is not known to be bad (``verify=True`` checks them all up front)."""
        paths = self.skipped_paths
        total = len(self.samples) + len(self._dropped)
        if not paths:
            return f"no images skipped ({total} under {self.root})"
        names = [os.path.relpath(p, self.root) for p in paths[:show]]
        more = f" (and {len(paths) - show} more)" if len(paths) > show else ""
        return (f"skipped {len(paths)} of {total} images under {self.root} as unreadable (see the warnings for "
                f"why): {', '.join(names)}{more}")

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _log_skip(path: str, error: BaseException) -> None:
        logger.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)

    def load(self, index: int, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Read, orient, composite, resize, crop and (maybe) flip image ``index`` -> ``float32 [3, h, w]`` in
        ``[-1, 1]``, ``(w, h)`` = ``size`` or :meth:`output_size`; raises what PIL raises for a bad file."""
        path = self.samples[index][0]
        with Image.open(path) as image:
            image.load()
            image = decode_image(image, self.background)
        image = resize_and_crop(image, size or self.output_size(index), self.crop, self.flip)
        return pil_to_tensor(image)

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for CaptionedImageFolder of length {n}")
        index %= n
        shape = self.output_size(index)
        for j in self._candidates(index):
            if self._skip_flags[j]:
                continue
            try:
                image = self.load(j, shape)
            except _IMAGE_ERRORS as error:
                self._skip_flags[j] = 1
                self._log_skip(self.samples[j][0], error)
                continue
            return {self.image_key: image, self.caption_key: self.samples[j][1]}
        raise RuntimeError(f"every image under {self.root} failed to load ({self.num_skipped} skipped)")

    def __repr__(self) -> str:
        buckets = f", buckets={len(set(self.bucket_ids))}" if self.buckets else ""
        return (f"CaptionedImageFolder(root={str(self.root)!r}, n={len(self)}, size={self.size}, crop={self.crop!r}, "
                f"flip={self.flip}{buckets})")
