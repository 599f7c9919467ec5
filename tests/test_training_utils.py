"""ldm.training: run folders, atomic checkpoints, NaN guard, resume, image grids, precision rules, data loaders."""

import os

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm import training
from ldm.training import (
    AtomicCheckpointIO,
    ImageGridLogger,
    build_dataloaders,
    build_trainer,
    check_finite,
    find_resume_checkpoint,
    make_run_dir,
    resolve_precision,
)


class Squares(torch.utils.data.Dataset):
    """Random images with a dict interface like the project's datasets."""

    def __init__(self, n=32, size=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": f"item {i}"}


class Regressor(pl.LightningModule):
    """Tiny automatic-optimization module; ``nan_at`` makes the loss NaN from that step on."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 3, 1)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        loss = (self.net(x) - x.flip(1)).pow(2).mean()
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def log_images(self, batch, max_images=8):
        x = batch["image"][:max_images]
        return {"pair": [x, self.net(x).clamp(-1, 1)], "single": x}


def _loader(n=32, batch_size=4):
    return torch.utils.data.DataLoader(Squares(n), batch_size=batch_size, shuffle=False)


def _trainer(run_dir, max_steps, **kw):
    kw.setdefault("checkpoint_every", 2)
    return build_trainer(run_dir, max_steps=max_steps, log_every=1, enable_progress_bar=False,
                         enable_model_summary=False, **kw)


def test_make_run_dir_layout(tmp_path):
    run = make_run_dir(name="exp", root=tmp_path, timestamp="20250101-000000")
    assert run == tmp_path / "exp-20250101-000000"
    assert {p.name for p in run.iterdir()} == {"checkpoints", "images", "logs"}
    again = make_run_dir(name="exp", root=tmp_path, timestamp="20250101-000000")
    assert again != run and again.exists()
    explicit = make_run_dir(tmp_path / "mine", name="ignored")
    assert explicit == tmp_path / "mine" and (explicit / "checkpoints").is_dir()
    with pytest.raises(ValueError):
        make_run_dir(name="a/b", root=tmp_path)


def test_check_finite_names_the_step():
    check_finite(torch.tensor(1.5), 3)
    with pytest.raises(FloatingPointError, match="loss became NaN at step 7"):
        check_finite(torch.tensor(float("nan")), 7)
    with pytest.raises(FloatingPointError, match="became inf at step 2"):
        check_finite(float("inf"), 2)


def test_nan_loss_stops_training_naming_the_step(tmp_path):
    trainer = _trainer(tmp_path / "run", max_steps=10)
    with pytest.raises(FloatingPointError, match="loss became NaN at step 3"):
        trainer.fit(Regressor(nan_at=3), _loader())
    assert trainer.global_step <= 4


def test_resume_continues_the_step_count(tmp_path):
    run = tmp_path / "run"
    trainer = _trainer(run, max_steps=2)
    module = Regressor()
    trainer.fit(module, _loader())
    assert trainer.global_step == 2
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run / "checkpoints" / "step000002.ckpt").is_file()
    weight_after_2 = module.net.weight.detach().clone()
    # the checkpoint loads with weights_only=True (no arbitrary unpickling)
    payload = torch.load(last, weights_only=True)
    assert payload["global_step"] == 2

    resumed = Regressor()
    trainer2 = _trainer(run, max_steps=4)
    seen_steps = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_steps.append(trainer.global_step)
            if not seen_steps[1:]:
                torch.testing.assert_close(pl_module.net.weight, weight_after_2)

    trainer2.callbacks.append(Spy())
    trainer2.fit(resumed, _loader(), ckpt_path=str(last))
    assert seen_steps == [2, 3]
    assert trainer2.global_step == 4
    # the first session's scalar log survives the resume
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert (run / "logs" / "version_1" / "metrics.csv").is_file()
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_find_resume_checkpoint(tmp_path):
    run = make_run_dir(tmp_path / "run")
    torch.save({"global_step": 3}, run / "checkpoints" / "last.ckpt")
    assert find_resume_checkpoint(run) == (run / "checkpoints" / "last.ckpt", run)
    assert find_resume_checkpoint(run / "checkpoints" / "last.ckpt")[1] == run
    assert make_run_dir(None, "x", resume=run / "checkpoints" / "last.ckpt") == run
    with pytest.raises(FileNotFoundError):
        find_resume_checkpoint(tmp_path / "nope.ckpt")


def test_atomic_checkpoint_io_leaves_old_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)
    assert torch.equal(io.load_checkpoint(path)["a"], torch.ones(2))

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", broken_save)
    with pytest.raises(OSError):
        io.save_checkpoint({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt"]  # no temp file left behind


def test_atomic_checkpoint_io_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": Squares(2)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_image_grid_logger_writes_pngs(tmp_path):
    module = Regressor()
    batch = next(iter(_loader(batch_size=4)))
    logger = ImageGridLogger(tmp_path / "images", every_n_steps=5, max_images=3)
    paths = logger.log_now(module, batch, step=15)
    names = sorted(p.name for p in paths)
    assert names == ["pair_step000015.png", "single_step000015.png"]
    pair = Image.open(tmp_path / "images" / "pair_step000015.png")
    # 2 rows (inputs over outputs) of 3 images of 8 px with 2 px padding
    assert pair.size == (3 * 10 + 2, 2 * 10 + 2)
    assert module.training  # mode restored


def test_image_logger_runs_during_fit(tmp_path):
    trainer = _trainer(tmp_path / "run", max_steps=4, image_every=2)
    trainer.fit(Regressor(), _loader())
    images = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    assert "pair_step000002.png" in images and "pair_step000004.png" in images
    assert (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").is_file()


def test_precision_rules(monkeypatch):
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("16-mixed", "cpu")
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("8-bit", "cpu")
    assert resolve_precision("32", "cpu") == "32-true"
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16"):
        assert resolve_precision("bf16-mixed", "cpu") == "32-true"
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_build_dataloaders_accepts_both_layouts(monkeypatch):
    import sys
    import types

    module = types.ModuleType("_training_utils_data")
    module.Squares = Squares
    monkeypatch.setitem(sys.modules, "_training_utils_data", module)
    node = {"target": "_training_utils_data.Squares", "params": {"n": 10}}
    train, val = build_dataloaders({"params": {"batch_size": 4, "train": node, "validation": node}})
    assert len(train) == 2 and len(val) == 3  # train drops the last partial batch
    train, val = build_dataloaders({"batch_size": 5, "train": node})
    assert len(train) == 2 and val is None
    with pytest.raises(ValueError, match="train"):
        build_dataloaders({"params": {"batch_size": 4}})
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_dataloaders({"batch_size": 64, "train": node})


def test_loggers_by_name_and_image_grids_reach_them(tmp_path, monkeypatch):
    """lightning.logger picks csv / tensorboard / wandb (W&B offline writes its run folder); grids go to them."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    trainer = _trainer(run, max_steps=2, image_every=2, logger=["csv", "tensorboard", "wandb"])
    assert [type(x).__name__ for x in trainer.loggers] == ["CSVLogger", "TensorBoardLogger", "WandbLogger"]
    trainer.fit(Regressor(), _loader())
    import wandb

    wandb.finish()
    offline = list((run / "logs" / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "tensorboard")).Reload()
    assert "pair" in events.Tags()["images"] and "single" in events.Tags()["images"]
    with pytest.raises(training.ConfigError, match="unknown logger"):
        training.build_loggers(run, "mlflow")
    assert [type(x).__name__ for x in training.build_loggers(run, "csv")] == ["CSVLogger"]
