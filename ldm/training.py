"""Training plumbing shared by every stage (autoencoder, diffusion): run folders, Trainer, callbacks, data loaders.

Run folders (layout, lock, the latest checkpoint) live in :mod:`ldm.run_folder`; what a checkpoint holds so that a
resumed run continues exactly in :mod:`ldm.resume`. ``build_trainer`` wires both in: checkpoints are written
atomically (temp file + ``fsync`` + ``os.replace``), read back with ``torch.load(weights_only=True)``, and carry the
random states and data position; SIGTERM/SIGINT checkpoint the current step and end the run (:class:`GracefulStop`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.checkpoint import atomic_write
from ldm.data.buckets import BucketBatchSampler
from ldm.data.sampler import ResumableRandomSampler
from ldm.distributed import (
    build_strategy,
    check_strategy,
    global_batch,
    inherited_run_dir,
    is_launch_rank_zero,
    launch_world_size,
    relaunchable,
    scaled_learning_rate,
    seed_rank,
)
from ldm.resume import ResumeState
from ldm.run_folder import (  # noqa: F401  (the run-folder API has always been importable from here)
    RUN_SUBDIRS,
    training_session,
    RunFolderError,
    RunLock,
    find_resume_checkpoint,
    make_run_dir,
    prepare_run_dir,
    prune_step_checkpoints,
    save_run_config,
)
from ldm.util import ConfigError, check_keys, instantiate_from_config, to_container

PRECISIONS = ("32-true", "bf16-mixed")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the lightning: section

# key -> (type, default). None: off. Both training scripts read the section through lightning_settings.
LIGHTNING_KEYS: dict[str, tuple[type, Any]] = {
    "max_steps": (int, 10000),
    "max_minutes": (float, None),
    "precision": (str, "32-true"),
    "accelerator": (str, "auto"),
    "seed": (int, 0),
    "log_every": (int, 50),
    "checkpoint_every": (int, 1000),
    "keep_last_n": (int, 3),
    "keep_steps": (list, ()),
    "image_every": (int, 1000),
    "max_images": (int, 8),
    "val_every": (int, None),
    "limit_val_batches": (float, 1.0),
    "gradient_clip_val": (float, None),
    "scale_lr": (bool, False),
    "scale_factor_batches": (int, 8),
    "export_dtype": (str, "float32"),
    "logger": (tuple, "auto"),  # a name or a list of names: auto, csv, tensorboard, wandb
    # several processes (ldm.distributed): devices per node, nodes, Lightning strategy, micro-batches per step
    "devices": (object, 1),  # a count or "auto" (every GPU); Lightning's launcher, torchrun or srun starts them
    "num_nodes": (int, 1),
    "strategy": (str, "auto"),
    "accumulate_grad_batches": (int, 1),
    "timeout_minutes": (float, 30.0),  # a collective that waits this long (a dead rank) fails the run
}
# What a --resume may change (the rest of a resumed run's config must match its config.yaml).
RESUMABLE_LIGHTNING_KEYS = ("max_steps", "max_minutes", "log_every", "checkpoint_every", "image_every",
                            "max_images", "val_every", "limit_val_batches", "keep_last_n", "keep_steps",
                            # a run of N processes resumes on M (ldm.resume says what carries over)
                            "devices", "num_nodes", "strategy", "accumulate_grad_batches", "timeout_minutes")


def _typed(value: Any, kind: type, where: str) -> Any:
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int: limit_val_batches 1 means one batch, 1.0 all of them
    elif kind is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif kind is object:  # a count or "auto"
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
    elif kind is tuple:  # a name or a list of names
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif isinstance(value, str):
        return value
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             list: "a list of whole numbers", tuple: "a name or a list of names",
             object: "a whole number >= 1 or auto"}
    raise ConfigError(f"{where}: expected {names[kind]}, got {value!r} ({type(value).__name__})")


def lightning_settings(node: Any, **defaults: Any) -> dict[str, Any]:
    """The ``lightning:`` section with every key typed and defaulted (``defaults`` override the table's).

    ``ConfigError`` naming ``lightning.<key>`` for an unknown key or a value of the wrong type.
    """
    node = to_container(node) or {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"lightning: expected a mapping, got {type(node).__name__}")
    check_keys(node, LIGHTNING_KEYS, "lightning")
    settings = {}
    for key, (kind, default) in LIGHTNING_KEYS.items():
        value = node[key] if key in node else defaults.get(key, default)
        settings[key] = _typed(value, kind, f"lightning.{key}")
    check_strategy(settings["strategy"])
    for key in ("max_steps", "log_every", "checkpoint_every", "seed", "max_images", "scale_factor_batches",
                "num_nodes", "accumulate_grad_batches"):
        if settings[key] is not None and settings[key] < (0 if key == "seed" else 1):
            raise ConfigError(f"lightning.{key} must be >= {0 if key == 'seed' else 1}, got {settings[key]}")
    for key in ("image_every", "val_every", "max_minutes", "keep_last_n", "timeout_minutes"):
        if settings[key] is not None and settings[key] <= 0:
            settings[key] = None  # 0 means off (keep_last_n: keep every step checkpoint)
    return settings


def set_base_learning_rate(trainer: pl.Trainer, learning_rate: float) -> None:
    """Make ``learning_rate`` the base rate of every optimizer, after a resume restored the old one from the
    checkpoint (so a changed learning rate on ``--resume`` is applied, as documented, not silently dropped).
    ``LambdaLR`` schedules keep their position: ``lr = learning_rate * lr_factor * lambda(step)``, where
    ``lr_factor`` is a param group's own scale (1 when the group has none, e.g. the text encoder's group of
    :class:`ldm.models.diffusion_trainer.DiffusionTrainer` carries ``cond_stage_lr_factor``)."""
    learning_rate = float(learning_rate)
    scheduled = set()
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "lr_lambdas"):
            groups = scheduler.optimizer.param_groups
            scheduler.base_lrs = [learning_rate * group.get("lr_factor", 1.0) for group in groups]
            for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["initial_lr"] = base
                group["lr"] = base * fn(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]
            scheduled.add(id(scheduler.optimizer))
    for optimizer in trainer.optimizers:
        if id(optimizer) not in scheduled:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * group.get("lr_factor", 1.0)


# --------------------------------------------------------------------------------------------- precision


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 / AMX on x86, the BF16 extension on ARM)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # private probes: absence or failure only means "unknown"
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = set()
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags.update(line.split(":", 1)[1].split())
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        return False


def resolve_accelerator(accelerator: str = "auto") -> str:
    if accelerator != "auto":
        return accelerator
    if torch.cuda.is_available():
        return "gpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Validate ``precision``; bf16 on a CPU without native bf16 falls back to ``32-true`` (with a warning).

    fp16 is refused on CPU (no autocast kernels worth having, and no loss scaling there).
    """
    precision = str(precision)
    device = resolve_accelerator(accelerator)
    if precision in ("16", "16-mixed", "16-true"):
        if device == "cpu":
            raise ValueError("fp16 precision is not supported on CPU; use 'bf16-mixed' or '32-true'")
        return precision
    if precision in ("32", "32-true"):
        return "32-true"
    if precision in ("bf16", "bf16-mixed"):
        if device == "cpu" and not cpu_supports_bf16():
            warnings.warn("this CPU has no native bf16 support: training in 32-true instead of bf16-mixed")
            return "32-true"
        return "bf16-mixed"
    raise ValueError(f"precision must be one of {PRECISIONS} (or 16-mixed on GPU), got {precision!r}")


# --------------------------------------------------------------------------------------------- checkpoint IO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the target folder, then ``os.replace``: a crash never leaves a torn file.

    Loading uses ``weights_only=True`` unless asked otherwise: Lightning's own checkpoints (tensors, numbers,
    strings, dicts) need nothing else, so resuming never unpickles arbitrary objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        weights_only = True if weights_only is None else weights_only
        map_location = "cpu" if map_location is None else map_location
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only)
        except Exception as error:
            if not weights_only:
                raise
            raise ValueError(
                f"{path}: torch.load(weights_only=True) refused this checkpoint ({error}). It holds objects other "
                "than tensors and plain containers; if you trust it, pass weights_only=False to trainer.fit."
            ) from error


# --------------------------------------------------------------------------------------------- callbacks


class GracefulStop(Callback):
    """SIGTERM (SLURM and cloud preemption) or SIGINT: finish the current step, then end training as on a normal end
    (``FinalCheckpoint`` writes ``step<N>.ckpt`` and ``last.ckpt``, the script exports). ``received`` holds the
    signal and ``exit_code`` the conventional ``128 + signal`` the script should exit with. A second signal stops at
    once (``KeyboardInterrupt``)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        super().__init__()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_start = -1

    @property
    def exit_code(self) -> int:
        return 0 if self.received is None else 128 + int(self.received)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: stopping after this step and saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's own SIGTERM handler (registered just before training), which would end the run with exit 0
        if threading.current_thread() is not threading.main_thread():
            return
        if getattr(trainer, "received_sigterm", False):
            self.received = signal.SIGTERM
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_start:
            return  # mid-way through accumulated micro-batches: stop after the optimizer step, which is saved
        stop = self.received is not None
        if trainer.world_size > 1:
            # every rank stops after the same step, or the others would wait for it in the next all-reduce
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


def check_finite(value: torch.Tensor | float, step: int, name: str = "loss") -> None:
    """Raise ``FloatingPointError("<name> became NaN/inf at step <step>")`` unless ``value`` is finite."""
    if isinstance(value, torch.Tensor):
        finite = bool(torch.isfinite(value.detach()).all())
    else:
        finite = math.isfinite(float(value))
    if not finite:
        kind = "NaN" if (torch.isnan(value).any() if isinstance(value, torch.Tensor) else math.isnan(float(value))) else "inf"
        raise FloatingPointError(
            f"{name} became {kind} at step {step}; training stopped. Lower the learning rate, use 32-true "
            "precision, or resume from an earlier checkpoint."
        )


def _losses_in(outputs: Any) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(outputs, torch.Tensor):
        yield "loss", outputs
    elif isinstance(outputs, Mapping):
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                yield str(key), value


class NaNGuard(Callback):
    """Stops training with ``FloatingPointError`` naming the step when a loss returned by ``training_step`` is NaN/inf.

    Works for automatic optimization (``{"loss": ...}``) and manual optimization (a tensor or a dict of scalars).
    Modules that step optimizers themselves can call ``check_finite`` before ``backward`` to stop even earlier.
    """

    def __init__(self):
        super().__init__()
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # by batch end the counter has moved past the optimizer step that produced ``outputs``
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, value in _losses_in(outputs):
            check_finite(value, self._step, name)


class ImageGridLogger(Callback):
    """Every ``every_n_steps`` steps, save ``pl_module.log_images(batch, max_images=...)`` as PNG grids.

    The hook returns ``{key: images}`` with images in [-1, 1], either one tensor ``[B, 3, H, W]`` (laid out
    ``nrow`` per row) or a list of tensors of equal batch size, each becoming one row (e.g. inputs over
    reconstructions). Grids go to ``<image_dir>/<key>_step<N:06d>.png``.
    """

    def __init__(self, image_dir: str | os.PathLike, every_n_steps: int, max_images: int = 8, nrow: int = 8):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.image_dir = Path(image_dir)
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.nrow = nrow
        self.saved: list[Path] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        self._last_step = step
        self.log_now(pl_module, batch, step, trainer.loggers)

    @torch.no_grad()
    def log_now(self, pl_module, batch, step: int, loggers: Iterable[Any] = ()) -> list[Path]:
        """Write the grids as PNG and send them to ``loggers`` (TensorBoard, W&B) too."""
        import torchvision

        if not hasattr(pl_module, "log_images"):
            raise ValueError(f"{type(pl_module).__name__} has no log_images(batch, max_images) hook")
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.log_images(batch, max_images=self.max_images)
        finally:
            pl_module.train(was_training)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for key, value in images.items():
            if isinstance(value, (list, tuple)):
                nrow = value[0].shape[0]
                grid_input = torch.cat([v.detach().float().cpu() for v in value], dim=0)
            else:
                nrow = min(self.nrow, value.shape[0])
                grid_input = value.detach().float().cpu()
            grid_input = ((grid_input.clamp(-1, 1) + 1) / 2)
            grid = torchvision.utils.make_grid(grid_input, nrow=nrow, padding=2)
            path = self.image_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}_step{step:06d}.png"
            atomic_write(path, lambda tmp: torchvision.utils.save_image(grid, tmp, format="png"))
            paths.append(path)
            log_image(loggers, key, grid, step)
        self.saved.extend(paths)
        return paths


class SkippedImagesReport(Callback):
    """Logs ``data/skipped_images`` (the training dataset's count of unreadable files it skipped) each epoch and
    prints its one-line ``skip_summary()`` at the end of training when any were skipped."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("data/skipped_images", float(self.dataset.num_skipped), on_epoch=True, on_step=False,
                      sync_dist=True, reduce_fx="sum")  # each rank counts the files it read

    def on_train_end(self, trainer, pl_module) -> None:
        if self.dataset.num_skipped and trainer.is_global_zero:
            log.warning("training data: %s", self.dataset.skip_summary())


def log_image(loggers: Iterable[Any], key: str, grid: torch.Tensor, step: int) -> None:
    """Send an image grid ``[3, H, W]`` in [0, 1] to every logger that takes images (TensorBoard, W&B)."""
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            logger.experiment.add_image(key, grid.clamp(0, 1), global_step=step)
        elif kind == "WandbLogger":
            image = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            logger.log_image(key=key, images=[image], step=step)


class StepTimer(Callback):
    """Wall-clock training speed: ``steps_per_second`` over the optimizer steps of this ``fit`` call
    (validation, logging and checkpointing time included)."""

    def __init__(self):
        super().__init__()
        self.start_time: float | None = None
        self.start_step = 0
        self.steps = 0
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_time = time.perf_counter()
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start_time is not None:
            self.seconds = time.perf_counter() - self.start_time
            self.steps = trainer.global_step - self.start_step

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


class DistributedRun(Callback):
    """What several processes need once Lightning has started them: each loader's sampler takes its rank's share
    (``set_distributed``), every rank but 0 draws its own random stream (:func:`ldm.distributed.seed_rank`; a
    resumed run then restores each rank's saved stream), and rank 0 states the run's scale (processes, global batch,
    learning rate), logs it and appends it to ``launch.json`` in the run folder."""

    def __init__(self, loaders: Iterable[Any] = (), seed: int = 0, run_dir: str | os.PathLike | None = None,
                 scale_lr: bool = False):
        super().__init__()
        self.loaders = [loader for loader in loaders if loader is not None]
        self.seed = int(seed)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.scale_lr = bool(scale_lr)
        self.summary: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        for loader in self.loaders:
            dataset = getattr(loader, "dataset", None)
            streamed = isinstance(dataset, torch.utils.data.IterableDataset)
            if streamed and trainer.world_size > 1 and getattr(dataset, "epoch_length", None) is None:
                # ranks whose shares differ would run different numbers of steps and wait for each other forever
                raise ConfigError(f"{trainer.world_size} processes read shards: set an epoch length (samples per "
                                  "process and epoch: --epoch-length N) so that every rank runs the same steps")
            parts = (dataset,) if streamed else (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None))
            for part in parts:
                if hasattr(part, "set_distributed"):
                    part.set_distributed(trainer.global_rank, trainer.world_size)
        seed_rank(self.seed, trainer.global_rank)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Lightning sets the epoch of samplers only; a stream (shards) reshuffles by its own set_epoch
        dataset = getattr(self.loaders[0], "dataset", None) if self.loaders else None
        if isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(trainer.current_epoch)

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume restored the step
        loader = self.loaders[0] if self.loaders else None
        per_device = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None),
                                                                     "batch_size", None) or 0
        accumulate = int(getattr(pl_module, "accumulate_grad_batches", None) or trainer.accumulate_grad_batches)
        self.summary = {
            "processes": trainer.world_size, "nodes": trainer.num_nodes, "devices_per_node": trainer.num_devices,
            "strategy": type(trainer.strategy).__name__, "accelerator": type(trainer.accelerator).__name__,
            "per_device_batch": int(per_device), "accumulate_grad_batches": accumulate,
            "global_batch": global_batch(per_device, trainer.world_size, accumulate),
            "learning_rate": float(getattr(pl_module, "learning_rate", float("nan"))), "scale_lr": self.scale_lr,
            "start_step": int(trainer.global_step),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        if not trainer.is_global_zero:
            return
        s = self.summary
        log.info("%d process(es) (%d node(s) x %d device(s), %s): global batch %d = %d per device x %d process(es) x "
                 "%d accumulated; learning rate %.4g (%s)", s["processes"], s["nodes"], s["devices_per_node"],
                 s["strategy"], s["global_batch"], s["per_device_batch"], s["processes"], accumulate,
                 s["learning_rate"], "base x global batch: scale_lr" if self.scale_lr else "as configured")
        if self.run_dir is not None:
            path = self.run_dir / "launch.json"
            sessions = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
            sessions.append(self.summary)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(sessions, indent=1), encoding="utf-8"))


# --------------------------------------------------------------------------------------------- trainer


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


LOGGERS = ("csv", "tensorboard", "wandb")


def build_loggers(run_dir: str | os.PathLike, names: str | Iterable[str] = "auto") -> list:
    """Lightning loggers writing under ``run_dir/logs``: ``csv`` (``version_<N>/metrics.csv``, a new folder per fit
    call, so a resumed run keeps the earlier sessions' rows), ``tensorboard`` (``logs/tensorboard``), ``wandb``
    (Weights & Biases through Lightning's ``WandbLogger``; ``WANDB_MODE=offline`` keeps the run in ``logs/wandb``).
    ``auto``: csv, and tensorboard when it is installed."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    names = [names] if isinstance(names, str) else list(names)
    if names == ["auto"]:
        names = ["csv"] + (["tensorboard"] if _tensorboard_available() else [])
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"lightning.logger: unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)} or auto")
    run_dir = Path(run_dir)
    loggers = []
    for name in dict.fromkeys(names):
        if name == "csv":
            loggers.append(CSVLogger(save_dir=str(run_dir), name="logs"))
        elif name == "tensorboard":
            if not _tensorboard_available():
                raise ConfigError("lightning.logger tensorboard needs tensorboard: pip install -e '.[tensorboard]'")
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tensorboard",
                                             default_hp_metric=False))
        else:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("lightning.logger wandb needs wandb: pip install -e '.[wandb]'") from None
            from pytorch_lightning.loggers import WandbLogger

            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(save_dir=str(run_dir / "logs"), name=run_dir.name,
                                       project=os.environ.get("WANDB_PROJECT", "latent-diffusion-lab")))
    return loggers


class StepCheckpoints(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps only the newest ``keep_last_n`` step files and the ``keep_steps`` a user pins
    (a run of SD's size writes gigabytes a checkpoint)."""

    def __init__(self, *args: Any, keep_last_n: int | None = None, keep_steps: Iterable[int] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_last_n = keep_last_n
        self.keep_steps = tuple(int(step) for step in keep_steps)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.prune(trainer)

    def prune(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self.dirpath:
            prune_step_checkpoints(self.dirpath, self.keep_last_n, self.keep_steps)


class FinalCheckpoint(Callback):
    """``step<N>.ckpt`` and ``last.ckpt`` for the final step when it is not a multiple of ``every``
    (``StepCheckpoints`` only saves on that grid, so the last steps would be lost to ``--resume`` and to
    ``export_diffusion``), then that callback's pruning.

    Saved at the end of the last batch (``max_steps`` reached, or a stop asked for), like the step checkpoints: by
    ``on_train_end`` Lightning has closed the epoch, and a checkpoint from there would resume at the start of the next
    epoch instead of where the data stopped. ``on_train_end`` saves only what that missed (a time limit)."""

    def __init__(self, checkpoints: StepCheckpoints, every: int):
        self.checkpoints = checkpoints
        self.every = int(every)
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every == 0 or step == self._saved_step:
            return
        self._saved_step = step
        dirpath = Path(self.checkpoints.dirpath)
        # weights_only=False: the whole training state (optimizers, loops), as ModelCheckpoint writes it; saying so
        # also keeps Lightning from logging that it "defaulted" (which reads like an unpickling warning)
        trainer.save_checkpoint(dirpath / f"step{step:06d}.ckpt", weights_only=False)
        trainer.save_checkpoint(dirpath / "last.ckpt", weights_only=False)
        self.checkpoints.prune(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps or trainer.should_stop:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.interrupted:
            self._save(trainer)


def build_trainer(
    run_dir: str | os.PathLike,
    max_steps: int,
    log_every: int = 50,
    checkpoint_every: int = 1000,
    precision: str = "32-true",
    accelerator: str = "auto",
    devices: int | str = "auto",
    extra_callbacks: Iterable[Callback] = (),
    image_every: int | None = None,
    max_images: int = 8,
    val_every: int | None = None,
    limit_val_batches: int | float = 1.0,
    gradient_clip_val: float | None = None,
    enable_progress_bar: bool = True,
    train_loader: torch.utils.data.DataLoader | None = None,
    keep_last_n: int | None = None,
    keep_steps: Iterable[int] = (),
    logger: str | Iterable[str] = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    accumulate_grad_batches: int = 1,
    automatic_optimization: bool = True,
    timeout_minutes: float | None = 30.0,
    val_loader: torch.utils.data.DataLoader | None = None,
    seed: int = 0,
    scale_lr: bool = False,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A step-bound Lightning ``Trainer`` writing into ``run_dir`` (see the module docstring for the layout).

    Callbacks: tqdm progress bar, :class:`StepCheckpoints` (``step<N>.ckpt`` every ``checkpoint_every`` steps, the
    newest ``keep_last_n`` (``None``: all) and the ``keep_steps`` kept, plus ``last.ckpt``, never ``-vN`` copies), ``FinalCheckpoint`` (the same at the last step when it is off that
    grid), ``NaNGuard``, ``StepTimer`` (``trainer.step_timer``), ``GracefulStop`` (``trainer.graceful_stop``),
    ``ResumeState`` (random states, and the data position of ``train_loader``'s
    :class:`~ldm.data.sampler.ResumableRandomSampler`), an ``ImageGridLogger`` into ``run_dir/images`` every
    ``image_every`` steps (when given; the module needs ``log_images``) and ``extra_callbacks``.
    Validation runs every ``val_every`` optimizer steps (never when ``None``). ``precision`` goes through
    ``resolve_precision`` (bf16 only where the CPU supports it, never fp16 on CPU).

    Several processes: ``devices`` per node x ``num_nodes``, ``strategy`` (``auto``: DDP when there is more than one
    process) with collectives that fail after ``timeout_minutes``; :class:`DistributedRun` gives each rank its share
    of the data and its own random stream. ``accumulate_grad_batches`` micro-batches per optimizer step are
    accumulated by Lightning for ``automatic_optimization`` modules; a manually optimized module (the autoencoder's
    GAN loop) accumulates itself, so Lightning is told 1 and DDP looks for parameters a backward did not reach.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if log_every < 1 or checkpoint_every < 1:
        raise ValueError(f"log_every and checkpoint_every must be >= 1, got {log_every}, {checkpoint_every}")
    run_dir = prepare_run_dir(run_dir)
    precision = resolve_precision(precision, accelerator)

    checkpoint = StepCheckpoints(
        keep_last_n=keep_last_n,
        keep_steps=keep_steps,
        dirpath=run_dir / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=checkpoint_every,
        save_top_k=-1,
        save_last=True,
        save_on_train_epoch_end=False,
        # one "latest": a reused folder must overwrite last.ckpt, not add last-v1.ckpt beside a stale one
        enable_version_counter=False,
    )
    timer = StepTimer()
    stop = GracefulStop()
    # FinalCheckpoint after GracefulStop: it sees the stop that GracefulStop decides at the same batch end
    callbacks = [checkpoint, NaNGuard(), timer, stop, FinalCheckpoint(checkpoint, checkpoint_every),
                 ResumeState.for_loader(train_loader),
                 DistributedRun((train_loader, val_loader), seed=seed, run_dir=run_dir, scale_lr=scale_lr)]
    if enable_progress_bar:
        callbacks.insert(0, TQDMProgressBar(refresh_rate=1))
    if hasattr(getattr(train_loader, "dataset", None), "skip_summary"):
        callbacks.append(SkippedImagesReport(train_loader.dataset))
    if image_every:
        callbacks.append(ImageGridLogger(run_dir / "images", every_n_steps=int(image_every), max_images=max_images))
    callbacks.extend(extra_callbacks)
    # a new logs/version_<N>/ per fit call: CSVLogger deletes an existing metrics.csv in its folder, and a
    # resumed run must keep the history of the earlier sessions
    loggers = build_loggers(run_dir, logger)

    validation = {}
    if val_every is None:
        validation = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    else:
        # check_val_every_n_epoch=None makes val_check_interval count optimizer steps across epochs
        validation = {
            "val_check_interval": int(val_every),
            "check_val_every_n_epoch": None,
            "limit_val_batches": limit_val_batches,
            "num_sanity_val_steps": 0,
        }
    if isinstance(getattr(train_loader, "sampler", None), ResumableRandomSampler) or isinstance(
            getattr(train_loader, "batch_sampler", None), BucketBatchSampler):
        # ResumeState restores the position; Lightning only knows loaders with a state_dict of their own
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    per_node = devices
    if devices == "auto":  # what Lightning will pick: every GPU, else one device
        per_node = torch.cuda.device_count() if resolve_accelerator(accelerator) == "gpu" else 1
    several = int(per_node) > 1 or int(num_nodes) > 1 or launch_world_size() > 1
    if strategy == "auto" and several:
        strategy = "ddp"
    if not automatic_optimization:  # our checkpoints are taken after the step, as for automatic optimization
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    trainer_kwargs.setdefault("use_distributed_sampler", False)  # our samplers and shards split the data themselves
    trainer = pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=int(max_steps),
        max_epochs=-1,
        accelerator=accelerator,
        devices=devices,
        num_nodes=int(num_nodes),
        strategy=build_strategy(strategy, timeout_minutes, find_unused_parameters=not automatic_optimization),
        accumulate_grad_batches=int(accumulate_grad_batches) if automatic_optimization else 1,
        precision=precision,
        callbacks=callbacks,
        logger=loggers,
        log_every_n_steps=int(log_every),
        plugins=[AtomicCheckpointIO()],
        gradient_clip_val=gradient_clip_val,
        enable_progress_bar=enable_progress_bar,
        **validation,
        **trainer_kwargs,
    )
    trainer.step_timer = timer
    trainer.graceful_stop = stop
    trainer.run_dir = run_dir
    return trainer


def trainer_from_settings(run_dir: str | os.PathLike, settings: Mapping[str, Any], train_loader, val_loader=None,
                          automatic_optimization: bool = True, **kwargs: Any) -> pl.Trainer:
    """``build_trainer`` from a typed ``lightning:`` section (:func:`lightning_settings`); validation only when there
    is a validation loader."""
    max_minutes = settings["max_minutes"]
    return build_trainer(
        run_dir,
        max_steps=settings["max_steps"],
        log_every=settings["log_every"],
        checkpoint_every=settings["checkpoint_every"],
        precision=settings["precision"],
        accelerator=settings["accelerator"],
        image_every=settings["image_every"],
        max_images=settings["max_images"],
        val_every=settings["val_every"] if val_loader is not None else None,
        limit_val_batches=settings["limit_val_batches"],
        gradient_clip_val=settings["gradient_clip_val"],
        max_time=_dt.timedelta(minutes=float(max_minutes)) if max_minutes else None,
        train_loader=train_loader,
        keep_last_n=settings["keep_last_n"],
        keep_steps=settings["keep_steps"],
        logger=settings["logger"],
        devices=settings["devices"],
        num_nodes=settings["num_nodes"],
        strategy=settings["strategy"],
        accumulate_grad_batches=settings["accumulate_grad_batches"],
        automatic_optimization=automatic_optimization,
        timeout_minutes=settings["timeout_minutes"],
        val_loader=val_loader,
        seed=settings["seed"],
        scale_lr=settings["scale_lr"],
        **kwargs,
    )


def set_learning_rate(trainer: pl.Trainer, module: pl.LightningModule, base: float, per_device_batch: int,
                      settings: Mapping[str, Any]) -> float:
    """``module.learning_rate`` for this launch: ``base``, or ``base x global batch`` with ``lightning.scale_lr``
    (:func:`ldm.distributed.scaled_learning_rate`), the global batch counting the trainer's processes."""
    accumulate = int(getattr(module, "accumulate_grad_batches", None) or settings["accumulate_grad_batches"])
    module.learning_rate = scaled_learning_rate(base, per_device_batch, trainer.world_size, accumulate,
                                                settings["scale_lr"])
    return module.learning_rate


@contextlib.contextmanager
def training_run(run_dir: str | os.PathLike | None, name: str, resume_checkpoint, config: Any,
                 resumable: tuple[str, ...], settings: Mapping[str, Any]):
    """The run folder of this training process, held for the session (``yield``s its path).

    Rank 0 (or the only process) makes or reopens it and holds it (:func:`ldm.run_folder.training_session`: lock,
    config checks, ``config.yaml``); the other ranks use the folder rank 0 chose and write nothing of their own.
    Processes started together by ``torchrun`` or ``srun`` cannot agree on a new timestamped name: they need
    ``--run-dir`` (or ``--resume``).
    """
    if not is_launch_rank_zero(settings["devices"]):
        folder = inherited_run_dir() or run_dir
        if folder is None and resume_checkpoint is not None:
            folder = find_resume_checkpoint(resume_checkpoint)[1]
        if folder is None:
            raise RunFolderError("several processes write one run: give them the same --run-dir")
        yield prepare_run_dir(folder)
        return
    if run_dir is None and resume_checkpoint is None and launch_world_size() > 1:
        raise RunFolderError(f"{launch_world_size()} processes write one run: give them all the same --run-dir")
    run_dir = make_run_dir(run_dir, name, resume_checkpoint)
    with training_session(run_dir, config, resume_checkpoint, resumable), relaunchable(run_dir):
        yield run_dir


def add_data_arguments(parser, kinds: str = "a captioned image folder") -> None:
    """``--data`` (what :mod:`ldm.data.sources` recognises), ``--val-fraction``, ``--epoch-length``."""
    parser.add_argument("--data", default=None,
                        help=f"train on this instead of the config's dataset: {kinds}, or WebDataset shards "
                             "('shards/train-{000000..000099}.tar', a folder of .tar files, a URL)")
    parser.add_argument("--val-fraction", type=float, default=0.02,
                        help="with --data: hold out this fraction (fixed by the seed) for validation unless the "
                             "data has its own train/ and validation/ folders; 0: no validation")
    parser.add_argument("--epoch-length", type=int, default=None,
                        help="with shards: samples per process and epoch (required with several processes)")


SCALE_FLAGS = {"--devices": "devices", "--num-nodes": "num_nodes", "--strategy": "strategy",
               "--accumulate-grad-batches": "accumulate_grad_batches"}


def add_scale_arguments(parser) -> None:
    """``--devices N|auto``, ``--num-nodes M``, ``--strategy``, ``--accumulate-grad-batches K`` (Lightning's names;
    each overrides its ``lightning:`` key)."""
    group = parser.add_argument_group("several devices and nodes (Lightning)")
    group.add_argument("--devices", default=None, help="devices per node: a number or auto (lightning.devices)")
    group.add_argument("--num-nodes", type=int, default=None, help="nodes (lightning.num_nodes)")
    group.add_argument("--strategy", default=None,
                       help="auto (DDP when there are several processes), ddp, ddp_spawn, fsdp, deepspeed")
    group.add_argument("--accumulate-grad-batches", type=int, default=None,
                       help="micro-batches per optimizer step (lightning.accumulate_grad_batches)")


def apply_scale_arguments(config: Any, args) -> None:
    """Write the flags :func:`add_scale_arguments` defined into ``config.lightning``."""
    section = dict(to_container(config.get("lightning") or {}))
    for flag, key in SCALE_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            section[key] = int(value) if key == "devices" and str(value).isdigit() else value
    config.lightning = section


def exit_if_stopped(trainer: pl.Trainer) -> None:
    """After the script saved its weights: ``SystemExit(128 + signal)`` when a signal ended training early."""
    stop = getattr(trainer, "graceful_stop", None)
    if stop is None or stop.received is None:
        return
    log.warning("stopped by %s at step %d: checkpoint and weights saved; continue with --resume %s",
                signal.Signals(stop.received).name, trainer.global_step, getattr(trainer, "run_dir", "<run>"))
    raise SystemExit(stop.exit_code)


# --------------------------------------------------------------------------------------------- data


def build_dataset(node: Any, path: str = "data.params.train") -> torch.utils.data.Dataset:
    """A dataset from a ``{target, params}`` node (errors name ``path``)."""
    return instantiate_from_config(node, path=path)


def build_dataloader(
    node: Any,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    path: str = "data.params.train",
    seed: int | None = None,
) -> torch.utils.data.DataLoader:
    """``DataLoader`` over ``build_dataset(node)``; ``seed`` (default 0) fixes the shuffling order.

    Shuffling uses a :class:`ResumableRandomSampler` (epoch ``e`` in the order of ``randperm(n, seed + e)``), so a
    resumed run continues the epoch where it stopped; the loader's own generator (worker seeds) is seeded too, so
    making an iterator never draws from the global random state that training uses.
    """
    dataset = build_dataset(node, path)
    seed = 0 if seed is None else int(seed)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # shards: the dataset splits itself across ranks and workers, shuffles in its buffer, and has no position
        # to resume (ldm.resume)
        return torch.utils.data.DataLoader(dataset, batch_size=int(batch_size), num_workers=int(num_workers),
                                           drop_last=drop_last, persistent_workers=num_workers > 0,
                                           generator=torch.Generator().manual_seed(seed))
    if len(dataset) == 0:
        raise ValueError(f"{path}: the dataset is empty")
    if drop_last and len(dataset) < batch_size:
        where = path.rsplit(".", 1)[0]
        raise ValueError(f"{path}: {len(dataset)} samples are fewer than one batch of {batch_size}; set a smaller "
                         f"batch, e.g. {where}.batch_size={max(1, len(dataset))} on the command line")
    if getattr(dataset, "buckets", False) is True:
        # aspect-ratio buckets: every batch from one bucket so that its images stack
        try:
            batch_sampler = BucketBatchSampler(dataset.bucket_ids, int(batch_size), seed=seed, shuffle=shuffle,
                                               drop_last=drop_last)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=int(num_workers),
                                           persistent_workers=num_workers > 0,
                                           generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=ResumableRandomSampler(len(dataset), seed=seed, shuffle=shuffle),
        num_workers=int(num_workers),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


DATA_KEYS = ("batch_size", "val_batch_size", "num_workers", "train", "validation")


def _data_node(data_config: Any) -> tuple[dict, str]:
    """Accept CompVis' ``data: {params: {batch_size, train, validation}}`` and the flat ``data: {batch_size, train, ...}``."""
    data = to_container(data_config) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected a mapping, got {type(data).__name__}")
    if "params" in data and isinstance(data["params"], Mapping):
        # CompVis' layout names its (own) data module class beside the params; ours builds the loaders itself
        check_keys(data, ("params", "target"), "data")
        check_keys(data["params"], DATA_KEYS, "data.params")
        return dict(data["params"]), "data.params"
    check_keys(data, DATA_KEYS, "data")
    return dict(data), "data"


def build_dataloaders(
    data_config: Any, seed: int | None = None
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """``(train_loader, val_loader or None)`` from the ``data`` section of a config.

    Keys (under ``data.params`` or directly under ``data``): ``train`` and optional ``validation`` dataset nodes
    (``{target, params}``), ``batch_size`` (default 16), optional ``val_batch_size``, ``num_workers`` (default 0).
    The training loader shuffles and drops the last partial batch.
    """
    node, where = _data_node(data_config)
    if "train" not in node:
        raise ValueError(f"{where}: no 'train' dataset node (keys: {sorted(node)})")
    batch_size = int(node.get("batch_size", 16))
    if batch_size < 1:
        raise ValueError(f"{where}.batch_size must be >= 1, got {batch_size}")
    num_workers = int(node.get("num_workers", 0))
    train = build_dataloader(node["train"], batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                             path=f"{where}.train", seed=seed)
    val = None
    if node.get("validation"):
        val = build_dataloader(node["validation"], int(node.get("val_batch_size", batch_size)), shuffle=False,
                               num_workers=num_workers, path=f"{where}.validation")
    return train, val


def data_captions(dataset: Any, count: int = 8, look_at: int = 64, caption_key: str = "caption") -> list[str]:
    """Up to ``count`` distinct non-empty captions from the first ``look_at`` items of ``dataset``, in its order:
    the fixed prompts of the sample grids when training on the user's data."""
    captions: list[str] = []
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = iter(dataset)
    else:
        inner, indices = dataset, range(len(dataset))
        if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # a held-out split
            inner, indices = dataset.dataset, dataset.indices
        samples = getattr(inner, "samples", None)  # a captioned folder knows its captions without decoding images
        if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
            items = ({caption_key: samples[i][1]} for i in indices)
        else:
            items = (inner[i] for i in indices)
    for number, item in enumerate(items):
        if number >= look_at or len(captions) >= count:
            break
        caption = item.get(caption_key) if isinstance(item, Mapping) else None
        if isinstance(caption, str) and caption.strip() and caption not in captions:
            captions.append(caption)
    return captions


def steps_summary(timer: StepTimer) -> str:
    return f"{timer.steps} steps in {timer.seconds:.1f} s ({timer.steps_per_second:.2f} steps/s)"


def repo_root() -> Path:
    """The repository root (parent of ``ldm/``)."""
    return Path(__file__).resolve().parent.parent

