"""Weights on disk: atomic writes, safetensors first, never unpickling untrusted code.

A ``.safetensors`` file carries its config as JSON in the metadata under ``"config"`` (and any other
string entries the caller adds, e.g. ``"scale_factor"``), so one file is enough to rebuild the model.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import zipfile
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.util import check_targets, to_container


TMP_PREFIX = ".tmp-"


def _disk_full(error: BaseException, directory: str) -> bool:
    """Whether ``error`` (or what caused it) is a full disk. torch's zip writer reports one as
    ``RuntimeError: ... unexpected pos``, so an empty file system counts too."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stats = os.statvfs(directory)
        return stats.f_bavail * stats.f_frsize < 1 << 20
    except OSError:
        return False


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems cannot open a directory: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, ``fsync`` it, then rename over ``path``: a crash or power loss never leaves a
    half-written file, and the previous ``path`` survives any failure. The temp file is removed on failure; a full
    disk raises ``OSError(ENOSPC)`` saying which file failed and that the old one is intact."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write_fn(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; the result should read like any new file
        os.replace(tmp_path, path)
        _fsync_directory(directory)
    except Exception as error:
        if _disk_full(error, directory):
            kept = f"the previous {path} is intact" if os.path.exists(path) else f"{path} was not written"
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}; {kept}") from error
        raise
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def save_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Any = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Atomically save ``state_dict`` with ``config`` (JSON) and extra ``metadata`` (stringified) attached.

    ``dtype`` casts floating-point tensors (e.g. ``torch.float16`` to halve a shipped file).
    """
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    if config is not None:
        meta["config"] = json.dumps(to_container(config))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file; ``ValueError`` naming the file when it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # SafetensorError's "header too large" on a text file says nothing useful
        raise ValueError(f"{path}: not a model file (not a readable .safetensors file: {error})") from None


SAFETENSORS_MAX_HEADER = 100 * 2**20


class CheckpointFormatError(ValueError):
    """A file that is not a model checkpoint, or not the one its config describes."""


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header (``{``)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size <= min(SAFETENSORS_MAX_HEADER, os.path.getsize(path) - 8) and head[8:9] == b"{"


def _looks_like_legacy_pickle(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def load_state_dict(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", lazy: bool = False
) -> Mapping[str, torch.Tensor]:
    """Every tensor in a checkpoint file, judged by its content, not its name: safetensors, or a ``torch.save``
    archive read with ``torch.load(weights_only=True)`` (a Lightning/CompVis ``state_dict`` level is unwrapped).
    ``CheckpointFormatError`` (a ``ValueError``) naming the file for anything else: a text file, a truncated
    download, a pickle that would run code.

    ``lazy``: a safetensors file comes back as a :class:`LazyStateDict` (tensors read when asked for), a zip
    archive memory-mapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        try:
            return LazyStateDict(path) if lazy else load_file(path, device=str(map_location))
        except Exception as error:  # a header that parses but a body cut short
            raise CheckpointFormatError(f"{path}: a damaged or truncated safetensors file ({error})") from None
    if zipfile.is_zipfile(path) or _looks_like_legacy_pickle(path):
        try:
            # mmap needs a file name, and torch.load takes a *.safetensors name for a safetensors file
            if lazy and zipfile.is_zipfile(path) and not path.endswith(".safetensors"):
                payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            else:
                with open(path, "rb") as handle:  # a file object: torch.load must not judge by the name either
                    payload = torch.load(handle, map_location=map_location, weights_only=True)
        except Exception as error:
            raise CheckpointFormatError(
                f"{path}: torch.load(weights_only=True) refused it ({type(error).__name__}: {str(error)[:300]}); "
                "only tensors and plain containers are read, never pickled code") from None
        if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
            payload = payload["state_dict"]
        if not isinstance(payload, Mapping) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise CheckpointFormatError(f"{path}: holds no state dict of tensors")
        return dict(payload)
    raise CheckpointFormatError(f"{path}: not a model file (neither safetensors nor a torch checkpoint)")


class LazyStateDict(Mapping):
    """A ``.safetensors`` file as a read-only mapping that reads a tensor when it is asked for (``shape`` without
    reading it): a 5 GB checkpoint is never in memory twice."""

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self._keys = list(self._open().keys())

    def _open(self):
        if self._file is None:
            self._file = safe_open(self.path, framework="pt")
        return self._file

    def release(self) -> None:
        """Unmap the file: pages read so far stop counting as this process's memory (they would otherwise add the
        whole file on top of the model by the end of a load)."""
        self._file = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._open().get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open().get_slice(key).get_shape())


def load_config_from_checkpoint(path: str | os.PathLike, key: str = "config") -> dict:
    """The config JSON stored under ``key`` in a ``.safetensors`` file's metadata, its targets checked.

    The file may come from anyone, so every ``target`` in it must be on the allow-list
    (:func:`ldm.util.check_targets`: ``UntrustedTargetError`` naming target and file, nothing imported).
    ``ValueError`` when the entry is missing or is not JSON.
    """
    meta = read_safetensors_metadata(path)
    if key not in meta:
        raise ValueError(f"{path}: no {key!r} entry in the safetensors metadata (keys: {sorted(meta)})")
    try:
        config = json.loads(meta[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({error})") from error
    check_targets(config, path, path=f"metadata.{key}")
    return config


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or mismatched:
        def head(items):
            return items[:8] + ([f"... {len(items) - 8} more"] if len(items) > 8 else [])

        raise ValueError(
            f"checkpoint does not fit the {what} config: "
            f"{len(missing)} missing {head(missing)}, {len(unexpected)} unexpected {head(unexpected)}, "
            f"{len(mismatched)} shape mismatches {head(mismatched)}"
        )
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)
