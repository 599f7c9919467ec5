"""Run folders: where a training run lives, who may write to it, and which checkpoint is its latest.

Layout::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        .lock              the one process writing here: {"pid", "host", "started"}; stale locks are taken over
        config.yaml        the config the current session runs with
        configs/           session-<N>.yaml: the config of every session (first run and each --resume)
        checkpoints/       last.ckpt and step<N>.ckpt (never -v1 copies: one "latest")
        images/ logs/      sample grids and scalar logs
        *.safetensors      final weights, written by the stage's script

A new run refuses a folder that already holds one (that is what ``--resume`` is for); a second process is refused
while the first holds the lock. ``find_resume_checkpoint`` picks the newest readable checkpoint, falling back from a
missing or torn ``last.ckpt`` to the newest valid ``step<N>.ckpt``, and says so.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import TMP_PREFIX, atomic_write
from ldm.util import to_container

log = logging.getLogger(__name__)

RUN_SUBDIRS = ("checkpoints", "images", "logs")
LOCK_FILE = ".lock"
STEP_CHECKPOINT = re.compile(r"^step(\d+)\.ckpt$")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: held by another process, or already holding a run."""


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Make sure ``run_dir`` and its ``checkpoints/``, ``images/``, ``logs/`` exist; returns it as a Path."""
    run_dir = Path(run_dir)
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


def holds_a_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` has any file in it (empty sub-folders and the lock do not count: :class:`RunLock` judges a
    held folder)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any((path.is_file() or path.is_symlink()) and path != run_dir / LOCK_FILE
                                    for path in run_dir.rglob("*"))


def make_run_dir(
    run_dir: str | os.PathLike | None = None,
    name: str = "run",
    resume: str | os.PathLike | None = None,
    root: str | os.PathLike = "runs",
    timestamp: str | None = None,
) -> Path:
    """The run folder, created with its sub-folders.

    ``run_dir`` when given; else, when resuming, the run the checkpoint ``resume`` belongs to; else a new
    ``root/<name>-<YYYYmmdd-HHMMSS>/`` (a numeric suffix avoids clobbering an existing run). A new run (no
    ``resume``) into a folder that already holds files raises :class:`RunFolderError`: continuing it silently would
    mix two runs' checkpoints.
    """
    if run_dir is not None:
        if resume is None and holds_a_run(run_dir):
            raise RunFolderError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick an empty --run-dir"
            )
        return prepare_run_dir(run_dir)
    if resume is not None:
        return prepare_run_dir(find_resume_checkpoint(resume)[1])
    if not name or re.search(r"[\\/]", name):
        raise ValueError(f"run name must be a non-empty name without path separators, got {name!r}")
    stamp = timestamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        path = Path(root) / f"{name}-{stamp}-{suffix}"
        suffix += 1
    return prepare_run_dir(path)


def save_run_config(run_dir: str | os.PathLike, config: Any, filename: str = "config.yaml") -> Path:
    """Write the resolved config as YAML (atomically) into the run folder, and a copy as ``configs/session-<N>.yaml``
    (one per session, so what every earlier session ran with is kept)."""
    run_dir = Path(run_dir)
    text = OmegaConf.to_yaml(OmegaConf.create(to_container(config)))
    sessions = run_dir / "configs"
    number = 1 + max((int(m.group(1)) for p in sessions.glob("session-*.yaml")
                      if (m := re.fullmatch(r"session-(\d+)\.yaml", p.name))), default=0)
    atomic_write(sessions / f"session-{number:03d}.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    path = run_dir / filename
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files an interrupted write left under ``run_dir`` (hold the run's lock first)."""
    removed = []
    for path in Path(run_dir).rglob(f"{TMP_PREFIX}*"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d unfinished temporary file(s) left by an interrupted write in %s", len(removed), run_dir)
    return removed


# --------------------------------------------------------------------------------------------- one writer


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a live holder from a re-used PID."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class RunLock:
    """One writer per run folder: ``<run>/.lock`` is created exclusively and holds ``{"pid", "host", "started"}``.

    A lock whose process is gone (same host, PID not alive or re-used) is stale and taken over with a warning;
    otherwise :meth:`acquire` raises :class:`RunFolderError` naming the holder. Use as a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if not isinstance(holder, dict) or "pid" not in holder:
            return True  # torn or foreign content: no process can be named as its owner
        if holder.get("host") != socket.gethostname():
            return False  # cannot look at another machine's processes
        pid = int(holder["pid"])
        if not _process_alive(pid):
            return True
        ticks = holder.get("start_ticks")
        return ticks is not None and _process_start_ticks(pid) not in (None, ticks)

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _process_start_ticks(os.getpid()),
              "started": _dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise RunFolderError(
                        f"{self.run_dir} is being written by process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('started')}); wait for it to finish, or, if that process is gone, delete "
                        f"{self.path}"
                    ) from None
                log.warning("taking over the stale lock %s (holder %s is gone)", self.path, holder)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunFolderError(f"could not take the lock {self.path} (it keeps being re-created)")

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if isinstance(holder, dict) and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def training_session(
    run_dir: str | os.PathLike,
    config: Any,
    resume_checkpoint: str | os.PathLike | None = None,
    resumable: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Hold ``run_dir`` for one training session: take its lock, remove unfinished temp files, check a resumed
    session's config against the run's (:func:`check_resume_config`), set aside the log rows of abandoned steps, and
    write the session's config; the lock is released on the way out, whatever happens."""
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        remove_stale_temp_files(run_dir)
        if resume_checkpoint is not None:
            check_resume_config(run_dir, config, resumable)
            set_aside_abandoned_metrics(run_dir, checkpoint_step(resume_checkpoint))
        save_run_config(run_dir, config)
        yield run_dir


# --------------------------------------------------------------------------------------------- the latest checkpoint


def checkpoint_step(path: str | os.PathLike) -> int:
    """``global_step`` of a Lightning checkpoint, read without loading its tensors (``mmap``).

    ``ValueError`` naming the file when it is torn, empty or not a checkpoint.
    """
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a torn zip, a text file, an empty file: all "unreadable" to the caller
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, Mapping) or "global_step" not in payload:
        raise ValueError(f"{path}: not a Lightning checkpoint (no global_step)")
    return int(payload["global_step"])


def step_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step<N>.ckpt`` files in ``checkpoint_dir``, newest first."""
    return sorted(((int(m.group(1)), p) for p in Path(checkpoint_dir).glob("step*.ckpt")
                   if (m := STEP_CHECKPOINT.match(p.name))), reverse=True)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path:
    """The newest readable checkpoint in ``checkpoint_dir``: ``last.ckpt`` unless it is missing, unreadable or older
    than a readable ``step<N>.ckpt`` (an interrupted run can leave it so), in which case that step file, with a
    warning. ``FileNotFoundError`` listing what was tried when none is readable."""
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / "last.ckpt"
    problems = []
    last_step = None
    if last.is_file():
        try:
            last_step = checkpoint_step(last)
        except ValueError as error:
            problems.append(str(error))
    else:
        problems.append(f"{last}: missing")
    for number, path in step_checkpoints(checkpoint_dir):
        if last_step is not None and number <= last_step:
            break
        try:
            step = checkpoint_step(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        if last_step is None or step > last_step:
            log.warning("resuming from %s (step %d): %s", path, step, "; ".join(problems) or
                        f"{last} is older (step {last_step})")
            return path
    if last_step is not None:
        return last
    raise FileNotFoundError(f"no readable checkpoint in {checkpoint_dir}: " + "; ".join(problems or ["empty"]))


def prune_step_checkpoints(checkpoint_dir: str | os.PathLike, keep_last_n: int | None,
                           pinned: tuple[int, ...] = ()) -> list[Path]:
    """Delete ``step<N>.ckpt`` files but the newest ``keep_last_n`` and the ``pinned`` steps (``None``: keep all);
    ``last.ckpt`` is never touched. Returns what was deleted."""
    if keep_last_n is None:
        return []
    removed = []
    for number, path in step_checkpoints(checkpoint_dir)[max(0, int(keep_last_n)):]:
        if number not in pinned:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def find_resume_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint, run_dir)`` for ``--resume``: a ``.ckpt`` file, a run folder or its ``checkpoints/`` folder
    (then :func:`latest_checkpoint` picks the file)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        ckpt = latest_checkpoint(folder)
    elif path.is_file():
        ckpt = path
    else:
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return ckpt, run_dir


# --------------------------------------------------------------------------------------------- a resumed run's config


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def check_resume_config(run_dir: str | os.PathLike, config: Any, resumable: tuple[str, ...]) -> list[str]:
    """Compare the config a resumed session will run with to the run's ``config.yaml``.

    Keys in ``resumable`` (dotted, e.g. ``lightning.max_steps``) may change and are applied; any other change
    raises :class:`RunFolderError` listing it, so a run never claims a config it does not run with. Returns the
    changed resumable keys as ``"key: old -> new"``. The stored file is read as plain YAML (nothing is built).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    old = _flatten(to_container(OmegaConf.load(path)))
    new = _flatten(to_container(config))
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key, "<unset>") != new.get(key, "<unset>")]
    described = {key: f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}" for key in changed}
    refused = [key for key in changed if key not in resumable]
    if refused:
        raise RunFolderError(
            f"--resume {run_dir}: the config differs from the run's config.yaml in "
            + "; ".join(described[key] for key in refused)
            + f". A resumed run can change only {', '.join(resumable)}; start a new run to change the rest"
        )
    for key in changed:
        log.info("resumed with a changed setting: %s", described[key])
    return [described[key] for key in changed]


# --------------------------------------------------------------------------------------------- logs of a resumed run


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def set_aside_abandoned_metrics(run_dir: str | os.PathLike, resumed_step: int) -> int:
    """Move the rows of earlier sessions' ``metrics.csv`` logged after ``resumed_step`` (steps that were trained,
    then lost to an interruption, and will be trained again) into ``metrics.abandoned.csv`` beside them, so every
    step appears once. Returns the number of rows moved."""
    moved = 0
    for path in Path(run_dir, "logs").glob("version_*/metrics.csv"):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames or [], list(reader)
        if "step" not in fields:
            continue
        keep = [r for r in rows if not r["step"] or int(float(r["step"])) < resumed_step]
        gone = [r for r in rows if r["step"] and int(float(r["step"])) >= resumed_step]
        if not gone:
            continue
        moved += len(gone)
        abandoned = path.with_name("metrics.abandoned.csv")
        if abandoned.exists():
            with open(abandoned, newline="", encoding="utf-8") as handle:
                gone = list(csv.DictReader(handle)) + gone
        _write_csv(abandoned, fields, gone)
        _write_csv(path, fields, keep)
    if moved:
        log.info("resuming at step %d: %d logged row(s) of abandoned steps moved to metrics.abandoned.csv",
                 resumed_step, moved)
    return moved


__all__ = [
    "LOCK_FILE", "RUN_SUBDIRS", "RunFolderError", "RunLock", "check_resume_config", "checkpoint_step",
    "find_resume_checkpoint",
    "holds_a_run", "latest_checkpoint", "make_run_dir", "prepare_run_dir", "prune_step_checkpoints",
    "remove_stale_temp_files", "save_run_config", "set_aside_abandoned_metrics", "step_checkpoints",
    "training_session",
]
