"""Training plumbing shared by every stage (autoencoder, diffusion): run folders, Trainer, callbacks, data loaders.

Run folder layout (``make_run_dir``)::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml        the resolved config the run used
        checkpoints/       Lightning checkpoints for resuming: last.ckpt and step<N>.ckpt every checkpoint_every steps
        images/            PNG grids from the module's ``log_images`` hook: <key>_step<N>.png
        logs/              CSVLogger (version_<N>/metrics.csv, one folder per fit/resume) and, when tensorboard
                           is installed, logs/tensorboard/
        *.safetensors      final weights, written by the stage's script

Resume with ``trainer.fit(module, ..., ckpt_path=<run>/checkpoints/last.ckpt)``: checkpoints are written
atomically (temp file + ``os.replace``) and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
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
from ldm.util import instantiate_from_config, to_container

RUN_SUBDIRS = ("checkpoints", "images", "logs")
PRECISIONS = ("32-true", "bf16-mixed")


# --------------------------------------------------------------------------------------------- run folders


def make_run_dir(
    run_dir: str | os.PathLike | None = None,
    name: str = "run",
    resume: str | os.PathLike | None = None,
    root: str | os.PathLike = "runs",
    timestamp: str | None = None,
) -> Path:
    """The run folder, created with its sub-folders.

    ``run_dir`` when given; else, when resuming, the run the checkpoint ``resume`` belongs to; else a new
    ``root/<name>-<YYYYmmdd-HHMMSS>/`` (a numeric suffix avoids clobbering an existing run).
    """
    if run_dir is not None:
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


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Make sure ``run_dir`` and its ``checkpoints/``, ``images/``, ``logs/`` exist; returns it as a Path."""
    run_dir = Path(run_dir)
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


def save_run_config(run_dir: str | os.PathLike, config: Any, filename: str = "config.yaml") -> Path:
    """Write the resolved config as YAML (atomically) into the run folder."""
    path = Path(run_dir) / filename
    text = OmegaConf.to_yaml(OmegaConf.create(to_container(config)))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def find_resume_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint, run_dir)`` for ``--resume``: a ``.ckpt`` file, a run folder or its ``checkpoints/`` folder."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "checkpoints" / "last.ckpt", path / "last.ckpt"]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            raise FileNotFoundError(f"no last.ckpt under {path} (looked for {[str(c) for c in candidates]})")
    elif path.is_file():
        ckpt = path
    else:
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return ckpt, run_dir


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
        self.log_now(pl_module, batch, step)

    @torch.no_grad()
    def log_now(self, pl_module, batch, step: int) -> list[Path]:
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
        self.saved.extend(paths)
        return paths


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


# --------------------------------------------------------------------------------------------- trainer


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class FinalCheckpoint(Callback):
    """At the end of training, ``step<N>.ckpt`` and ``last.ckpt`` for the final step when ``max_steps`` is not a
    multiple of ``every`` (``ModelCheckpoint`` only saves on that grid, so the last steps would be lost to
    ``--resume`` and to ``export_diffusion``)."""

    def __init__(self, dirpath: str | os.PathLike, every: int):
        self.dirpath = Path(dirpath)
        self.every = int(every)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every == 0 or trainer.interrupted:
            return
        trainer.save_checkpoint(self.dirpath / f"step{step:06d}.ckpt")
        trainer.save_checkpoint(self.dirpath / "last.ckpt")


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
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A step-bound Lightning ``Trainer`` writing into ``run_dir`` (see the module docstring for the layout).

    Callbacks: tqdm progress bar, ``ModelCheckpoint`` (``step<N>.ckpt`` every ``checkpoint_every`` steps, all kept,
    plus ``last.ckpt``), ``FinalCheckpoint`` (the same at the last step when it is off that grid), ``NaNGuard``, ``StepTimer`` (reachable as ``trainer.step_timer``), an ``ImageGridLogger``
    into ``run_dir/images`` every ``image_every`` steps (when given; the module needs ``log_images``) and
    ``extra_callbacks``.
    Validation runs every ``val_every`` optimizer steps (never when ``None``). ``precision`` goes through
    ``resolve_precision`` (bf16 only where the CPU supports it, never fp16 on CPU).
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if log_every < 1 or checkpoint_every < 1:
        raise ValueError(f"log_every and checkpoint_every must be >= 1, got {log_every}, {checkpoint_every}")
    run_dir = prepare_run_dir(run_dir)
    precision = resolve_precision(precision, accelerator)

    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=checkpoint_every,
        save_top_k=-1,
        save_last=True,
        save_on_train_epoch_end=False,
    )
    timer = StepTimer()
    callbacks = [checkpoint, FinalCheckpoint(run_dir / "checkpoints", checkpoint_every), NaNGuard(), timer]
    if enable_progress_bar:
        callbacks.insert(0, TQDMProgressBar(refresh_rate=1))
    if image_every:
        callbacks.append(ImageGridLogger(run_dir / "images", every_n_steps=int(image_every), max_images=max_images))
    callbacks.extend(extra_callbacks)
    # a new logs/version_<N>/ per fit call: CSVLogger deletes an existing metrics.csv in its folder, and a
    # resumed run must keep the history of the earlier sessions
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tensorboard", default_hp_metric=False))

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
    trainer = pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=int(max_steps),
        max_epochs=-1,
        accelerator=accelerator,
        devices=devices,
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
    trainer.run_dir = run_dir
    return trainer


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
    """``DataLoader`` over ``build_dataset(node)``; ``seed`` fixes the shuffling order."""
    dataset = build_dataset(node, path)
    if len(dataset) == 0:
        raise ValueError(f"{path}: the dataset is empty")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"{path}: {len(dataset)} samples are fewer than one batch of {batch_size}")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        num_workers=int(num_workers),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=generator,
    )


def _data_node(data_config: Any) -> tuple[dict, str]:
    """Accept CompVis' ``data: {params: {batch_size, train, validation}}`` and the flat ``data: {batch_size, train, ...}``."""
    data = to_container(data_config) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected a mapping, got {type(data).__name__}")
    if "params" in data and isinstance(data["params"], Mapping):
        return dict(data["params"]), "data.params"
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


def steps_summary(timer: StepTimer) -> str:
    return f"{timer.steps} steps in {timer.seconds:.1f} s ({timer.steps_per_second:.2f} steps/s)"


def repo_root() -> Path:
    """The repository root (parent of ``ldm/``)."""
    return Path(__file__).resolve().parent.parent

