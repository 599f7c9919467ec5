"""WebDataset tar shards as a training dataset, for data too large for a folder of files.

A shard is a plain ``.tar`` whose members are grouped into samples by name, as img2dataset and ``ldm make-shards``
write them::

    train-000000.tar
      000000000.jpg      the image (jpg, jpeg, png or webp; the original file's bytes)
      000000000.txt      its caption, UTF-8
      000000000.json     {"caption": "...", ...}  (caption field "text" or "caption")
      000000001.png
      ...

The sample key is the member name up to the first dot of its file name (``webdataset``'s rule), the rest is the
extension. Images are decoded with the image folder's functions (:mod:`ldm.data.image_folder`: EXIF orientation,
alpha composited onto ``background``, 16-bit grey kept in float, shorter side resized then cropped), so a shard sample
and the same image in a folder give identical tensors. A ``txt`` caption is stripped of surrounding whitespace (as a
sidecar ``.txt`` in a folder is); a ``json`` caption is taken as it is.

Splitting, so that no sample is read twice in one epoch: every training process (rank ``r`` of ``R``) and every
``DataLoader`` worker of it (``w`` of ``W``) is one *slot*, ``r * W + w`` of ``R * W``. With at least as many shards
as slots, slot ``k`` reads the shards at positions ``k, k + R*W, ...``; with fewer, every slot reads every shard and
keeps every ``(R*W)``-th sample, starting at its own slot number (it decodes only those). All ranks must use the same
number of workers. Shuffling (``shuffle_buffer > 0``) permutes the shard list the same way on every slot, seeded by
``(seed, epoch)``, so the split stays disjoint, then shuffles each slot's samples through a buffer.

``epoch_length`` (samples per epoch per process) gives the dataset a length and makes every rank yield exactly that
many samples per epoch, stopping early or starting another pass over its share: ranks whose shares differ in size
then still agree on the number of steps. Without it one epoch is one pass and ``len()`` is undefined.

Corrupt samples (an image that does not decode, no image member, a caption that is missing when one is needed, a
``txt`` that is not UTF-8, bad JSON, a member cut off by a truncated shard) are skipped, logged once and counted:
``num_skipped``, ``skipped_keys`` and ``skip_summary()``, as :class:`~ldm.data.image_folder.CaptionedImageFolder`
reports. Skips met in ``DataLoader`` workers reach the main process through shared-memory tables, one row per worker
(the first :data:`MAX_WORKERS` workers; :data:`SKIP_CAPACITY` distinct samples a row, later ones are counted each time
they are met and not named). Counts are per dataset object: with several ranks each reports its own. A shard that
cannot be opened at all (missing, not a tar file) raises an error naming it.

``pipe:`` URLs run a shell command, and a dataset node may come from a config someone else wrote, so they are
refused unless the environment variable ``LDM_ALLOW_PIPE_URLS=1`` says the user wants them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import zlib
from contextlib import closing
from typing import Iterable, Iterator, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from ldm.data.image_folder import (
    _IMAGE_ERRORS,
    CAPTION_FIELDS,
    decode_image,
    image_options,
    pil_to_tensor,
    resize_and_crop,
)

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # first one present is the sample's image
CAPTION_SOURCES = ("auto", "txt", "json", "metadata", "none")  # "metadata": the folder's word for json
MAX_WORKERS = 32
SKIP_CAPACITY = 512
_NAME_BYTES = 128
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__), not samples
# What a broken tar stream raises: short reads and bad headers (TarError), I/O and decompression errors.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
PIPE_ENV = "LDM_ALLOW_PIPE_URLS"


class SampleError(Exception):
    """A sample that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------- shard list


def expand_shard_urls(urls) -> list[str]:
    """``urls`` (a brace pattern / ``::``-separated string, or a sequence of them) -> the list of shard URLs, in
    order. ``ValueError`` when it names none."""
    if isinstance(urls, (str, os.PathLike)):
        expanded = expand_urls(os.fspath(urls))
    else:
        try:
            expanded = [url for item in urls for url in expand_urls(os.fspath(item))]
        except TypeError as error:
            raise ValueError(f"urls must be a string or a list of strings, got {urls!r}") from error
    expanded = [url for url in expanded if url]
    if not expanded:
        raise ValueError(f"urls names no shards: {urls!r}")
    return expanded


def check_shard_urls(urls: list[str]) -> None:
    """Refuse ``pipe:`` URLs (unless ``LDM_ALLOW_PIPE_URLS=1``) and local shards that do not exist, naming them,
    before any worker starts."""
    pipes = [url for url in urls if url.startswith("pipe:")]
    if pipes and os.environ.get(PIPE_ENV, "") != "1":
        raise ValueError(f"shard URL {pipes[0]!r} runs a shell command; set {PIPE_ENV}=1 if you wrote it yourself")
    missing = [url for url in urls if _local_path(url) is not None and not os.path.isfile(_local_path(url))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard(s) not found: {shown}")


def _local_path(url: str) -> Optional[str]:
    """The file a local shard URL names (a plain path or ``file:``, read as ``webdataset.gopen`` reads them),
    ``None`` for a remote one."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return None


def describe_urls(urls, expanded: list[str]) -> str:
    """How messages name the shards: the pattern as given, the one shard, or the first and how many."""
    if isinstance(urls, (str, os.PathLike)):
        return os.fspath(urls)
    return expanded[0] if len(expanded) == 1 else f"{expanded[0]} ... ({len(expanded)} shards)"


def shard_name(url: str) -> str:
    """The shard's file name (what skipped sample names start with)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------- splitting


def slot_plan(num_shards: int, slot: int, num_slots: int) -> tuple[list[int], int, int]:
    """What slot ``slot`` of ``num_slots`` reads: ``(shard positions, keep_every, keep_offset)``; it keeps sample
    ``j`` of its stream (counted over all the positions it reads) when ``j % keep_every == keep_offset``.

    ``num_shards >= num_slots``: its own shards ``slot, slot + num_slots, ...``, every sample kept. Fewer shards:
    all of them, every ``num_slots``-th sample from ``slot`` on. Either way the slots' samples are disjoint and
    together are every sample once."""
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} is not one of {num_slots}")
    if num_shards >= num_slots:
        return list(range(slot, num_shards, num_slots)), 1, 0
    return list(range(num_shards)), num_slots, slot


def worker_quota(epoch_length: int, worker: int, num_workers: int) -> int:
    """Samples worker ``worker`` of ``num_workers`` yields in an epoch of ``epoch_length`` per process (the
    first ``epoch_length % num_workers`` workers one more), so that the workers together yield exactly that."""
    return epoch_length // num_workers + (1 if worker < epoch_length % num_workers else 0)


def resolve_distributed(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else ``torch.distributed``'s when it is initialised, else the
    environment's ``RANK`` / ``WORLD_SIZE``, else ``(0, 1)``."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            found = dist.get_rank(), dist.get_world_size()
        else:
            try:
                found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            except ValueError as error:
                raise ValueError(f"RANK / WORLD_SIZE in the environment must be integers ({error})") from error
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of world_size={world_size} process(es)")
    return rank, world_size


def shuffle_buffered(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """``items`` in a random order drawn through a buffer of ``buffer_size`` (each new item replaces, and
    releases, a random one held); the buffer is shuffled and emptied at the end. ``buffer_size <= 1``: as is."""
    if buffer_size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


# ----------------------------------------------------------------------------------------------- reading


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard, in file order: ``{"__key__": str, "__url__": url, <ext>: bytes, ...}``.

    Consecutive members with the same key form one sample (extensions lower-cased). A member that cannot be read
    ends the shard, since a tar stream cannot resync: its sample comes out with ``"__error__"`` (why), as does a
    sample with two members of one extension. ``FileNotFoundError`` / ``ValueError`` naming the shard when it cannot
    be opened as a tar file at all."""
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"shard not found: {url}") from error
    except Exception as error:  # gopen raises anything its scheme handler raises
        raise ValueError(f"cannot open shard {url} ({type(error).__name__}: {error})") from error
    with closing(stream):
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except _TAR_ERRORS as error:
            raise ValueError(f"shard {url} is not a readable tar file ({type(error).__name__}: {error})") from error
        sample: Optional[dict] = None
        key = None
        try:
            for info in tar:
                key = None
                if not info.isreg() or _META_MEMBER.match(info.name):
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None:  # no extension: not part of any sample
                    continue
                data = tar.extractfile(info).read()
                tar.members = []  # stream mode keeps every header otherwise: memory grows with the shard
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                ext = ext.lower()
                if ext in sample:
                    sample["__error__"] = f"two members {info.name!r} in one sample"
                else:
                    sample[ext] = data
        except _TAR_ERRORS as error:
            why = f"shard is cut off or damaged here ({type(error).__name__}: {error}); the rest of it is not read"
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key if key is not None else "<unreadable header>", "__url__": url}
            sample["__error__"] = why
        if sample is not None:
            yield sample


def sample_caption(raw: dict, caption_source: str) -> str:
    """The caption of raw sample ``raw`` from its ``txt`` or ``json`` member (``"auto"``: ``txt`` if there is one,
    else ``json``; ``"none"``: ``""``). ``SampleError`` when it is missing or unreadable."""
    if caption_source == "none":
        return ""
    if caption_source in ("auto", "txt") and "txt" in raw:
        try:
            return raw["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError as error:
            raise SampleError(f"txt is not valid UTF-8 ({error.reason} at byte {error.start})") from error
    if caption_source in ("auto", "json", "metadata") and "json" in raw:
        try:
            entry = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SampleError(f"json member is not valid JSON ({error})") from error
        field = next((k for k in CAPTION_FIELDS if isinstance(entry, dict) and k in entry), None)
        if field is None:
            raise SampleError(f"json member has no caption field (one of {CAPTION_FIELDS})")
        if not isinstance(entry[field], str):
            raise SampleError(f"json caption {field!r} is a {type(entry[field]).__name__}, not a string")
        return entry[field]
    wanted = {"auto": "txt or json", "txt": "txt", "json": "json", "metadata": "json"}[caption_source]
    raise SampleError(f"no caption member ({wanted}; caption_source={caption_source!r})")


def sample_image(raw: dict, size: int, crop: str, flip: bool, background: tuple[int, int, int]) -> torch.Tensor:
    """The image of raw sample ``raw`` -> ``float32 [3, size, size]`` in ``[-1, 1]``, decoded exactly as
    :meth:`CaptionedImageFolder.load` decodes a file. ``SampleError`` when there is none or it does not decode."""
    ext = next((e for e in IMAGE_MEMBERS if e in raw), None)
    if ext is None:
        raise SampleError(f"no image member (one of {IMAGE_MEMBERS}; members: {sorted(k for k in raw if k[0] != '_')})")
    try:
        with Image.open(io.BytesIO(raw[ext])) as image:
            image.load()
            image = decode_image(image, background)
        image = resize_and_crop(image, size, crop, flip)
    except _IMAGE_ERRORS as error:
        raise SampleError(f"{ext} does not decode ({type(error).__name__}: {error})") from error
    return pil_to_tensor(image)


# ----------------------------------------------------------------------------------------------- skip counts


class SkipLog:
    """Distinct skipped samples, written by the process that met them and readable from any process.

    Shared-memory tables with one row per process: row 0 the main process, row ``1 + w`` ``DataLoader`` worker
    ``w`` (only that process writes its row, so no locks). Each row holds up to ``capacity`` sample names and their
    hashes, which also keep a sample met again in a later epoch from being logged or counted twice. Fork inherits
    the mapping; spawn pickles it as a shared handle. Workers past ``max_workers`` keep their skips to themselves."""

    def __init__(self, max_workers: int = MAX_WORKERS, capacity: int = SKIP_CAPACITY):
        rows = 1 + max_workers
        self.hashes = torch.zeros(rows, capacity, dtype=torch.int64).share_memory_()
        self.names = torch.zeros(rows, capacity, _NAME_BYTES, dtype=torch.uint8).share_memory_()
        # per row: [names recorded, skips past capacity (counted every time they are met), good samples read]
        self.counts = torch.zeros(rows, 3, dtype=torch.int64).share_memory_()
        self._private: set[str] = set()  # the overflow workers' own record

    @staticmethod
    def _row() -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id

    @staticmethod
    def _hash(name: str) -> int:
        value = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)
        return value or 1  # 0 marks an empty cell

    def record(self, name: str) -> bool:
        """Note skipped sample ``name``; ``True`` when it was not known yet (the caller logs it then)."""
        row = self._row()
        if row >= self.counts.shape[0]:
            if name in self._private:
                return False
            self._private.add(name)
            return True
        value = self._hash(name)
        if bool((self.hashes == value).any()):
            return False
        filled = int(self.counts[row, 0])
        if filled >= self.hashes.shape[1]:
            self.counts[row, 1] += 1
            return True
        encoded = name.encode()[:_NAME_BYTES]
        self.names[row, filled, :len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        self.hashes[row, filled] = value
        self.counts[row, 0] = filled + 1  # last: a reader never sees a count ahead of its name
        return True

    def count_read(self) -> None:
        """One more good sample read by this process."""
        row = self._row()
        if row < self.counts.shape[0]:
            self.counts[row, 2] += 1

    @property
    def skipped_names(self) -> list[str]:
        names = []
        for row in range(self.counts.shape[0]):
            for cell in range(int(self.counts[row, 0])):
                names.append(bytes(self.names[row, cell].tolist()).rstrip(b"\0").decode(errors="replace"))
        return names

    @property
    def num_skipped(self) -> int:
        return int(self.counts[:, :2].sum())

    @property
    def num_read(self) -> int:
        return int(self.counts[:, 2].sum())


# ----------------------------------------------------------------------------------------------- dataset


class ShardDataset(IterableDataset):
    """Captioned images from WebDataset tar shards (see the module docstring for the layout and the split).

    ``item = {image_key: float32 [3, size, size] in [-1, 1], caption_key: str, "key": the sample's key}``.

    Args:
        urls: a brace pattern (``"shards/train-{000000..000099}.tar"``), one shard, ``::``-separated patterns, or
            a list of any of these.
        size: output side in pixels (shorter side resized to it, then cropped square).
        crop: ``"center"`` or ``"random"``.  flip: random horizontal flip (p = 0.5).
        caption_source: ``"auto"`` (``txt``, else ``json``), ``"txt"``, ``"json"`` (``"metadata"`` is the same) or
            ``"none"`` (no caption needed, every caption ``""``: autoencoder training).
        background: colour transparent pixels are composited onto (as ``CaptionedImageFolder``'s).
        shuffle_buffer: 0 reads in shard order; ``n > 0`` permutes the shards per epoch and shuffles samples through
            a buffer of ``n`` (held as raw bytes).
        seed: seeds the shuffling, with the epoch (:meth:`set_epoch`).
        epoch_length: samples per epoch per process; ``len()`` returns it. ``None``: one pass, no length.
        rank, world_size: this process among the training processes; ``None``: from ``torch.distributed`` when it
            is initialised, else the environment's ``RANK`` / ``WORLD_SIZE``, else 0 / 1. Read when iteration
            starts, so a dataset built before the process group still splits by it.
    """

    def __init__(
        self,
        urls,
        size: int = 64,
        crop: str = "center",
        flip: bool = False,
        caption_source: str = "auto",
        image_key: str = "image",
        caption_key: str = "caption",
        background=(255, 255, 255),
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch_length: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        super().__init__()
        vars(self).update(image_options(size, crop, flip, caption_source, CAPTION_SOURCES, image_key, caption_key,
                                        background, reserved_keys=("key",)))
        if int(shuffle_buffer) != shuffle_buffer or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}")
        if epoch_length is not None and (int(epoch_length) != epoch_length or epoch_length < 1):
            raise ValueError(f"epoch_length must be a positive integer or None, got {epoch_length!r}")
        self.urls = expand_shard_urls(urls)
        check_shard_urls(self.urls)
        self.source = describe_urls(urls, self.urls)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.epoch_length = None if epoch_length is None else int(epoch_length)
        self.rank = rank
        self.world_size = world_size
        if rank is not None or world_size is not None:
            resolve_distributed(rank, world_size)  # fail now on a bad pair, not in a worker
        # Shared, so that set_epoch in the main process reaches persistent DataLoader workers.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._skips = SkipLog()

    # -- epoch and processes

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle order from the next iteration on (no effect with ``shuffle_buffer=0``)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Make this the dataset of process ``rank`` of ``world_size`` (for a trainer that knows better than the
        environment)."""
        self.rank, self.world_size = resolve_distributed(rank, world_size)

    def __len__(self) -> int:
        if self.epoch_length is None:
            # TypeError is what len() of an object without a length raises; loaders and Lightning expect it.
            raise TypeError("ShardDataset has no length without epoch_length (samples per epoch per process)")
        return self.epoch_length

    # -- skips

    @property
    def skipped_keys(self) -> list[str]:
        """``"<shard file>:<key>"`` of the samples skipped so far, including those met in ``DataLoader`` workers."""
        return self._skips.skipped_names

    @property
    def num_skipped(self) -> int:
        """How many distinct samples have been skipped so far (see the module docstring for the limits)."""
        return self._skips.num_skipped

    def skip_summary(self, show: int = 3) -> str:
        """One line for a log or an end-of-run summary, e.g. ``"skipped 2 samples of shards/train-{0..3}.tar as
        unreadable (see the warnings for why; 40 read so far): train-000001.tar:000000007, ..."``. Only samples read
        so far count."""
        count, names = self.num_skipped, self.skipped_keys
        read = self._skips.num_read
        if count == 0:
            return f"no samples skipped ({read} read so far from {self.source})"
        shown = names[:show]
        more = f" (and {count - len(shown)} more)" if count > len(shown) else ""
        return (f"skipped {count} samples of {self.source} as unreadable (see the warnings for why; {read} read so "
                f"far): {', '.join(shown)}{more}")

    # -- iteration

    def _slot(self) -> tuple[int, int, int, int]:
        """``(slot, num_slots, worker, num_workers)`` of the calling process."""
        rank, world_size = resolve_distributed(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return rank * num_workers + worker, world_size * num_workers, worker, num_workers

    def _raw_pass(self, epoch: int, pass_index: int, slot: int, num_slots: int) -> Iterator[dict]:
        """One pass over this slot's share: raw samples, shuffled when ``shuffle_buffer > 0``."""
        order = list(range(len(self.urls)))
        if self.shuffle_buffer:
            # the same permutation in every slot (seeded by what they share), so the split stays disjoint
            random.Random(f"shards:{self.seed}:{epoch}:{pass_index}").shuffle(order)
        positions, every, offset = slot_plan(len(order), slot, num_slots)

        def kept() -> Iterator[dict]:
            index = 0
            for position in positions:
                with closing(read_shard(self.urls[order[position]])) as samples:
                    for raw in samples:
                        if index % every == offset:
                            yield raw
                        index += 1

        rng = random.Random(f"samples:{self.seed}:{epoch}:{pass_index}:{slot}")
        return shuffle_buffered(kept(), self.shuffle_buffer, rng)

    def _decoded(self, raws: Iterator[dict]) -> Iterator[dict]:
        """Items from raw samples; bad ones are skipped, logged once and counted."""
        for raw in raws:
            name = f"{shard_name(raw['__url__'])}:{raw['__key__']}"
            try:
                if "__error__" in raw:
                    raise SampleError(raw["__error__"])
                caption = sample_caption(raw, self.caption_source)
                image = sample_image(raw, self.size, self.crop, self.flip, self.background)
            except SampleError as error:
                if self._skips.record(name):
                    logger.warning("skipping sample %s of %s (%s)", raw["__key__"], raw["__url__"], error)
                continue
            self._skips.count_read()
            yield {self.image_key: image, self.caption_key: caption, "key": raw["__key__"]}

    def __iter__(self) -> Iterator[dict]:
        slot, num_slots, worker, num_workers = self._slot()
        epoch = self.epoch
        if self.epoch_length is None:
            yield from self._decoded(self._raw_pass(epoch, 0, slot, num_slots))
            return
        quota = worker_quota(self.epoch_length, worker, num_workers)
        produced, pass_index = 0, 0
        while produced < quota:
            before = produced
            for item in self._decoded(self._raw_pass(epoch, pass_index, slot, num_slots)):
                yield item
                produced += 1
                if produced == quota:
                    return
            if produced == before:
                raise ValueError(
                    f"ShardDataset: slot {slot} of {num_slots} (rank x DataLoader worker) found no readable sample in "
                    f"its share of {len(self.urls)} shard(s) of {self.source}, so it cannot fill epoch_length="
                    f"{self.epoch_length}; use fewer workers or check the shards ({self.skip_summary()})")
            pass_index += 1

    def __repr__(self) -> str:
        return (f"ShardDataset(urls={self.source!r}, shards={len(self.urls)}, size={self.size}, crop={self.crop!r}, "
                f"flip={self.flip}, shuffle_buffer={self.shuffle_buffer}, epoch_length={self.epoch_length})")
