"""Weights on disk: atomic writes, safetensors first, never unpickling untrusted code.

A ``.safetensors`` file carries its config as JSON in the metadata under ``"config"`` (and any other
string entries the caller adds, e.g. ``"scale_factor"``), so one file is enough to rebuild the model.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
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


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or, failing that, a pickle checkpoint with ``weights_only=True``.

    Lightning/CompVis checkpoints keep the weights under ``"state_dict"``; that level is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # weights_only refuses arbitrary objects: say so instead of a pickle trace
        raise ValueError(
            f"{path}: could not be loaded with torch.load(weights_only=True) ({error}). "
            "Only plain tensor checkpoints are accepted; convert it to .safetensors."
        ) from error
    if isinstance(payload, Mapping) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path}: expected a mapping of tensors, got {type(payload).__name__}")
    return dict(payload)


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
