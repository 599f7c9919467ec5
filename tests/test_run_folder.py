"""Run folders and stops: one writer, one latest checkpoint, preemption, full disks, configs checked at start.

Each test holds one defect of the reliability sweep (issue 13) that the code had before.
"""

import errno
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from ldm.checkpoint import atomic_write
from ldm.run_folder import (
    RunFolderError,
    RunLock,
    check_resume_config,
    find_resume_checkpoint,
    latest_checkpoint,
    make_run_dir,
    remove_stale_temp_files,
    save_run_config,
    set_aside_abandoned_metrics,
)
from ldm.training import AtomicCheckpointIO, lightning_settings
from ldm.util import ConfigError
from tests.helpers import TINY_DIFFUSION_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AUTOENCODER_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny-autoencoder.yaml")


@pytest.fixture
def moved_run(trained, tmp_path):
    """A copy of the session's tiny trained run in a new place (a moved folder), free to be changed."""
    import shutil

    return shutil.copytree(trained[1], tmp_path / "moved")


# ------------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = make_run_dir(tmp_path / "run")
    with RunLock(run):
        with pytest.raises(RunFolderError, match=f"process {os.getpid()} on"):
            RunLock(run).acquire()
    RunLock(run).acquire().release()  # released: free again
    assert not (run / ".lock").exists()


def test_a_live_process_in_another_interpreter_holds_the_lock(tmp_path):
    run = make_run_dir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from ldm.run_folder import RunLock; "
        "lock = RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"), ROOT, str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"process {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (SIGKILL): its lock is stale and is taken over
    with RunLock(run) as lock:
        assert lock.held


def test_training_scripts_refuse_a_busy_folder_and_a_new_run_into_an_old_one(tmp_path, autoencoder_file, moved_run):
    from scripts import train_diffusion

    run = moved_run
    args = ["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match="already holds a run.*--resume"):
        train_diffusion.main(args + ["--run-dir", str(run)])
    busy = make_run_dir(tmp_path / "busy")
    with RunLock(busy):
        with pytest.raises(RunFolderError, match="being written by process"):
            train_diffusion.main(args + ["--run-dir", str(busy)])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


# ------------------------------------------------------------------------------------------------ the latest checkpoint


def _ckpt(path, step):
    torch.save({"global_step": step, "state_dict": {}}, path)


def test_resume_falls_back_to_the_newest_valid_step_file(tmp_path, caplog):
    run = make_run_dir(tmp_path / "run")
    ckpts = run / "checkpoints"
    for step in (2, 4, 6):
        _ckpt(ckpts / f"step{step:06d}.ckpt", step)
    _ckpt(ckpts / "last.ckpt", 6)
    assert find_resume_checkpoint(run)[0] == ckpts / "last.ckpt"

    (ckpts / "last.ckpt").write_bytes(open(ckpts / "step000006.ckpt", "rb").read()[:100])  # torn
    (ckpts / "step000006.ckpt").write_bytes(b"")  # empty
    with caplog.at_level(logging.WARNING, logger="ldm.run_folder"):
        assert find_resume_checkpoint(run) == (ckpts / "step000004.ckpt", run)
    assert "last.ckpt: not a readable checkpoint" in caplog.text and "step000004.ckpt" in caplog.text

    (ckpts / "last.ckpt").unlink()
    assert latest_checkpoint(ckpts) == ckpts / "step000004.ckpt"
    _ckpt(ckpts / "last.ckpt", 2)  # stale: a step file is newer
    assert latest_checkpoint(ckpts) == ckpts / "step000004.ckpt"
    for path in ckpts.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        find_resume_checkpoint(run)


def test_a_moved_folder_gets_no_versioned_checkpoint_copies(moved_run, autoencoder_file, caplog):
    from scripts import train_diffusion

    run = moved_run
    with caplog.at_level(logging.INFO):
        train_diffusion.main(["--resume", str(run), "--autoencoder", autoencoder_file, "--max-steps", "5"])
    assert "1 steps this session" in caplog.text and "(5 in all)" in caplog.text
    assert "weights_only` was not set" not in caplog.text  # every save says what it writes
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not [n for n in names if "-v" in n], names
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


# ------------------------------------------------------------------------------------------------ a resumed session


def test_resume_applies_the_resumable_keys_and_refuses_the_rest(tmp_path):
    run = make_run_dir(tmp_path / "run")
    config = {"trainer": {"params": {"learning_rate": 1e-3}}, "data": {"batch_size": 4},
              "lightning": {"max_steps": 10}}
    save_run_config(run, config)
    resumable = ("lightning.max_steps", "trainer.params.learning_rate")
    changed = check_resume_config(run, {**config, "lightning": {"max_steps": 20},
                                        "trainer": {"params": {"learning_rate": 5e-4}}}, resumable)
    assert changed == ["lightning.max_steps: 10 -> 20", "trainer.params.learning_rate: 0.001 -> 0.0005"]
    with pytest.raises(RunFolderError, match=r"data.batch_size: 4 -> 8.*can change only lightning.max_steps"):
        check_resume_config(run, {**config, "data": {"batch_size": 8}}, resumable)
    save_run_config(run, {**config, "lightning": {"max_steps": 20}})
    assert sorted(p.name for p in (run / "configs").iterdir()) == ["session-001.yaml", "session-002.yaml"]
    assert yaml.safe_load((run / "configs" / "session-001.yaml").read_text())["lightning"]["max_steps"] == 10
    assert yaml.safe_load((run / "config.yaml").read_text())["lightning"]["max_steps"] == 20


def test_a_learning_rate_changed_on_resume_is_used(moved_run, autoencoder_file):
    """Before: the optimizer's restored rate won and config.yaml claimed the new one."""
    import pytorch_lightning as pl

    from scripts import train_diffusion

    run = moved_run
    seen = []
    original = pl.Trainer.fit

    def spy(self, module, *args, **kwargs):
        class Record(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"],
                             trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0](trainer.global_step)))
        self.callbacks.append(Record())
        return original(self, module, *args, **kwargs)

    pl.Trainer.fit = spy
    try:
        train_diffusion.main(["--resume", str(run), "--autoencoder", autoencoder_file, "--max-steps", "7",
                              "trainer.params.learning_rate=0.0123"])
    finally:
        pl.Trainer.fit = original
    for step, lr, factor in seen:
        assert lr == pytest.approx(0.0123 * factor), step
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["params"]["learning_rate"] == 0.0123
    with pytest.raises(RunFolderError, match="p_uncond"):
        train_diffusion.main(["--resume", str(run), "--autoencoder", autoencoder_file, "--max-steps", "8",
                              "trainer.params.p_uncond=0.5"])


def test_abandoned_steps_leave_the_metrics_log(tmp_path):
    run = make_run_dir(tmp_path / "run")
    version = run / "logs" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n0,2,0.8\n0,3,0.7\n")
    assert set_aside_abandoned_metrics(run, 2) == 2
    assert (version / "metrics.csv").read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.0", "0,1,0.9"]
    assert (version / "metrics.abandoned.csv").read_text().splitlines()[1:] == ["0,2,0.8", "0,3,0.7"]


# ------------------------------------------------------------------------------------------------ preemption


def _preempt(tmp_path, signal_name="SIGTERM", at_item=13):
    marker = tmp_path / f"{signal_name}-sent"
    node = {"target": "tests.helpers.KillSwitchImages",
            "params": {"num_samples": 16, "size": 16, "kill_at": at_item, "marker": str(marker),
                       "signal_name": signal_name}}
    return node, marker


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_diffusion_preempted_saves_exports_and_exits_non_zero(tmp_path, autoencoder_file, signal_name):
    from ldm.checkpoint import read_safetensors_metadata
    from ldm.util import allow_target
    from scripts import train_diffusion

    allow_target("tests.helpers.KillSwitchImages")
    node, marker = _preempt(tmp_path, signal_name)
    config = yaml.safe_load(open(TINY_DIFFUSION_CONFIG))
    config["data"]["train"] = node
    config["lightning"]["max_steps"] = 10
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train_diffusion.main(["--config", str(path), "--autoencoder", autoencoder_file, "--run-dir", str(run)])
    assert info.value.code == 128 + getattr(signal, signal_name) and marker.exists()
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    exported = int(read_safetensors_metadata(run / "model.safetensors")["global_step"])
    assert 0 < last < 10 and exported == last
    assert (run / "checkpoints" / f"step{last:06d}.ckpt").is_file()
    assert not (run / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_autoencoder_preempted_writes_its_weights_and_exits_non_zero(tmp_path):
    from ldm.checkpoint import read_safetensors_metadata
    from ldm.util import allow_target
    from scripts import train_autoencoder

    allow_target("tests.helpers.KillSwitchImages")
    node, marker = _preempt(tmp_path)
    config = yaml.safe_load(open(TINY_AUTOENCODER_CONFIG))
    config["data"]["params"]["train"] = node
    config["lightning"]["max_steps"] = 10
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train_autoencoder.main(["--config", str(path), "--run-dir", str(run)])
    assert info.value.code == 128 + signal.SIGTERM
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < last < 10
    assert int(read_safetensors_metadata(run / "autoencoder.safetensors")["global_step"]) == last


# ------------------------------------------------------------------------------------------------ full disk


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"good"))

    def full(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"no space left on device while writing {path}; the previous .* is intact"):
        atomic_write(path, full)
    assert path.read_bytes() == b"good"
    assert os.listdir(path.parent) == ["last.ckpt"]  # no .tmp-* left behind


def test_a_full_disk_during_a_lightning_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def torch_zip_writer_on_a_full_disk(obj, f, *args, **kwargs):
        # what torch.save reports when the disk fills: a RuntimeError caused by the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 10087808 vs 10087700") from error

    monkeypatch.setattr(torch, "save", torch_zip_writer_on_a_full_disk)
    with pytest.raises(OSError, match="no space left on device while writing .*last.ckpt; the previous"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_unfinished_temp_files_are_removed_at_start(tmp_path, moved_run, autoencoder_file):
    from scripts import train_diffusion

    run = moved_run
    stale = run / "checkpoints" / ".tmp-abc123last.ckpt"
    stale.write_bytes(b"x" * 100)
    assert remove_stale_temp_files(tmp_path / "nothing") == []
    train_diffusion.main(["--resume", str(run), "--autoencoder", autoencoder_file, "--max-steps", "9"])
    assert not stale.exists()


# ------------------------------------------------------------------------------------------------ configs checked at start


def test_a_bad_sampler_in_the_config_fails_before_training(tmp_path, autoencoder_file):
    from scripts import train_diffusion

    run = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown sampler 'ddimm'"):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                              str(run), "trainer.params.sampler.name=ddimm"])
    assert not run.exists()
    with pytest.raises(ValueError, match="multiple"):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                              str(run), "trainer.params.sample_height=15"])
    assert not run.exists()


def test_wrong_types_name_the_key(tmp_path, autoencoder_file):
    from scripts import train_diffusion

    with pytest.raises(ConfigError, match=r"lightning.max_steps: expected a whole number, got 'ten'"):
        lightning_settings({"max_steps": "ten"})
    with pytest.raises(ConfigError, match=r"lightning.max_step \(did you mean lightning.max_steps\?\)"):
        lightning_settings({"max_step": 3})
    assert lightning_settings({"val_every": 0, "limit_val_batches": 1})["val_every"] is None
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"trainer.params.learning_rate: expected a number, got 'fast'"):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                              str(run), "trainer.params.learning_rate=fast"])
    with pytest.raises(ConfigError, match=r"lightning.checkpoint_every"):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                              str(run), "lightning.checkpoint_every=often"])
    assert not run.exists()


def test_make_demo_into_an_earlier_demo_says_how_to_start_again(tmp_path):
    from scripts import demo

    (tmp_path / "autoencoder" / "checkpoints").mkdir(parents=True)
    (tmp_path / "autoencoder" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="earlier demo run.*make clean-demo"):
        demo.main(["--out", str(tmp_path)])


def test_make_demo_passes_each_stage_its_overrides(tmp_path, monkeypatch):
    from ldm.cli import demo

    seen = {}

    def stop_after(stage):
        def main(argv):
            seen[stage] = argv
            if stage == "diffusion":
                raise SystemExit("stop")
            return str(tmp_path / "autoencoder.safetensors")
        return main

    monkeypatch.setattr(demo.train_autoencoder, "main", stop_after("autoencoder"))
    monkeypatch.setattr(demo.train_diffusion, "main", stop_after("diffusion"))
    with pytest.raises(SystemExit, match="stop"):
        demo.main(["--out", str(tmp_path / "demo"), "--diffusion-steps", "3000",
                   "--autoencoder-override", "lightning.max_steps=10",
                   "--diffusion-override", "trainer.params.high_noise_prob=0",
                   "--diffusion-override", "data.batch_size=16"])
    assert seen["autoencoder"][-1] == "lightning.max_steps=10"
    assert seen["diffusion"][-4:] == ["--max-steps", "3000", "trainer.params.high_noise_prob=0", "data.batch_size=16"]


@pytest.mark.parametrize("override, message", [
    ("lightning.precison=32-true", r"lightning.precison \(did you mean lightning.precision\?\)"),
    ("data.batch_sise=8", r"data.batch_sise \(did you mean data.batch_size\?\)"),
    ("trainer.params.learning_rat=1e-4", r"trainer.params.learning_rat \(did you mean trainer.params.learning_rate\?\)"),
    ("model.unet.params.model_chanels=8", r"unet.params.model_chanels \(did you mean unet.params.model_channels\?\)"),
    ("model.sampler_default=1", r"model.sampler_default \(did you mean model.sampler_defaults\?\)"),
    ("data.train.params.num_sample=3", r"train.params.num_sample \(did you mean .*num_samples\?\)"),
    ("lightnin.max_steps=3", r"config.lightnin \(did you mean config.lightning\?\)"),
])
def test_every_config_key_is_checked_with_the_nearest_valid_one(tmp_path, autoencoder_file, override, message):
    """Typos in any section, given in the file or as a dotlist override, stop the run before any work."""
    from scripts import train_diffusion

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                              str(run), override])
    assert not run.exists()


def test_autoencoder_config_keys_are_checked_too(tmp_path):
    from scripts import train_autoencoder

    with pytest.raises(ConfigError, match=r"data.params.batch_sise \(did you mean data.params.batch_size\?\)"):
        train_autoencoder.main(["--config", TINY_AUTOENCODER_CONFIG, "--run-dir", str(tmp_path / "run"),
                                "data.params.batch_sise=8"])
    with pytest.raises(ConfigError, match=r"model.base_learning_rat\b"):
        train_autoencoder.main(["--config", TINY_AUTOENCODER_CONFIG, "--run-dir", str(tmp_path / "run"),
                                "model.base_learning_rat=1e-4"])
    assert not (tmp_path / "run").exists()


def test_a_data_folder_smaller_than_a_batch_says_how_to_fix_it(tmp_path, autoencoder_file):
    from scripts import train_diffusion

    with pytest.raises(ValueError, match=r"16 samples are fewer than one batch of 64.*data.batch_size=16"):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir",
                              str(tmp_path / "run"), "data.batch_size=64"])
    assert not (tmp_path / "run").exists()  # a data error leaves no empty run folder behind


def test_step_checkpoints_keep_the_newest_and_the_pinned(tmp_path, autoencoder_file):
    from scripts import train_diffusion

    run = tmp_path / "run"
    train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir", str(run),
                          "--max-steps", "7", "lightning.checkpoint_every=1", "lightning.keep_last_n=2",
                          "lightning.keep_steps=[2]", "lightning.image_every=0", "lightning.val_every=0"])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000002.ckpt", "step000006.ckpt", "step000007.ckpt"]
    assert lightning_settings({})["keep_last_n"] == 3  # the default keeps a few
    assert lightning_settings({"keep_last_n": 0})["keep_last_n"] is None  # 0: keep them all
