"""Several training processes on CPU (gloo): Lightning's own launcher, and torchrun simulating two nodes.

The equality tests train ``tests.helpers.FixedNoiseTrainer`` on ``FixedNoiseImages``: every sample carries its own
timestep and noise and the latents are posterior means, so a step depends only on which samples it sees. Then two
processes x batch B must give the weights of one process x batch 2B (DDP averages the ranks' gradients), and a run
resumed on another number of processes must continue the same global data order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_DIFFUSION_CONFIG

ROOT = Path(__file__).resolve().parent.parent
TINY_AE_CONFIG = str(ROOT / "tests" / "configs" / "tiny-autoencoder.yaml")
FIXED = ["trainer.target=tests.helpers.FixedNoiseTrainer", "data.train.target=tests.helpers.FixedNoiseImages",
         # a constant rate: a run of 3 steps and one of 5 must agree on the rate of each step
         "trainer.params.p_uncond=0.0", "trainer.params.lr_schedule=constant", "lightning.val_every=0", "lightning.image_every=0",
         "lightning.accelerator=cpu", "lightning.logger=csv"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", LDM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LDM_RUN_DIR"):
        env.pop(name, None)
    return env


def _ldm(args: list[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def _dump(run: Path, rank: int, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "ranks" / f"rank{rank}-step{step}.safetensors"))


def _close(a: dict, b: dict, atol: float = 1e-7) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


def _same_training(a: dict, b: dict) -> None:
    """Weights after several AdamW steps that saw the same samples. Float rounding differs (a sum over 4 samples vs
    two sums of 2), and Adam's g / sqrt(v) blows it up for the few gradients near 0, so a handful of weights differ by
    up to about the learning rate (1e-3); different samples would move every weight by that much."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a if a[k].is_floating_point()])
    assert float(diff.abs().max()) <= 2e-3
    assert float(diff.abs().mean()) <= 2e-7, float(diff.abs().mean())
    assert float((diff.abs() > 1e-6).double().mean()) <= 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, autoencoder_file):
    """3 steps of 2 processes x batch 2, launched by Lightning (``--devices 2``)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    result = _ldm(["train-diffusion", "--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file,
                   "--run-dir", str(run), "--devices", "2", "--max-steps", "3", "data.batch_size=2", *FIXED])
    _ok(result)
    return run


def _one_process(run: Path, autoencoder_file: str, *extra: str) -> None:
    from scripts import train_diffusion

    train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir", str(run),
                          *FIXED, *extra])


def test_two_processes_equal_one_process_with_twice_the_batch(two_process_run, autoencoder_file, tmp_path):
    single = tmp_path / "single"
    _one_process(single, autoencoder_file, "data.batch_size=4", "lightning.max_steps=3")
    # DDP's averaged gradient of 2 x 2 samples is the gradient of the 4 samples one process sees
    _close(_dump(two_process_run, 0, 1), _dump(single, 0, 1))
    for step in (2, 3):
        _same_training(_dump(two_process_run, 0, step), _dump(single, 0, step))
    # every rank holds the same weights and the same EMA after every step
    for step in (1, 2, 3):
        rank0, rank1 = _dump(two_process_run, 0, step), _dump(two_process_run, 1, step)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(k.startswith("model_ema.") for k in rank0)


def test_two_process_run_writes_one_run_folder(two_process_run):
    run = two_process_run
    launches = json.loads((run / "launch.json").read_text())
    assert len(launches) == 1
    assert launches[0] | {"started": None} == launches[0] | {
        "processes": 2, "nodes": 1, "devices_per_node": 2, "per_device_batch": 2, "accumulate_grad_batches": 1,
        "global_batch": 4, "strategy": "DDPStrategy", "started": None}
    # rank 0 alone writes the config, logs, checkpoints and the exported weights; the lock is gone
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "configs").iterdir()) == ["session-001.yaml"]
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    assert not (run / ".lock").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # the data position counts samples of the one global order; the random states are kept per rank
    assert ckpt["resume_state"]["data"] == {"epoch": 0, "offset": 12}
    assert len(ckpt["resume_state"]["rng"]) == 2 and len(ckpt["caption_rng"]) == 2
    assert not torch.equal(ckpt["resume_state"]["rng"][0]["torch"], ckpt["resume_state"]["rng"][1]["torch"])


def test_resume_two_processes_on_one_continues_the_global_order(two_process_run, autoencoder_file, tmp_path):
    import shutil

    from scripts import train_diffusion

    resumed = tmp_path / "resumed"
    shutil.copytree(two_process_run, resumed)
    # 1 process x batch 2 x 2 accumulated keeps the global batch of 4; 2 more steps cross into epoch 1
    train_diffusion.main(["--resume", str(resumed), "--autoencoder", autoencoder_file, "--devices", "1", "--accumulate-grad-batches", "2",
                          "--max-steps", "5"])
    single = tmp_path / "single"
    _one_process(single, autoencoder_file, "data.batch_size=4", "lightning.max_steps=5")
    for step in (4, 5):
        _same_training(_dump(resumed, 0, step), _dump(single, 0, step))
    launches = json.loads((resumed / "launch.json").read_text())
    assert [(s["processes"], s["global_batch"], s["start_step"]) for s in launches] == [(2, 4, 0), (1, 4, 3)]


def test_accumulation_equals_the_larger_batch(autoencoder_file, tmp_path):
    accumulated, single = tmp_path / "accumulated", tmp_path / "single"
    _one_process(accumulated, autoencoder_file, "data.batch_size=2", "lightning.accumulate_grad_batches=2",
                 "lightning.max_steps=2")
    _one_process(single, autoencoder_file, "data.batch_size=4", "lightning.max_steps=2")
    _close(_dump(accumulated, 0, 1), _dump(single, 0, 1))
    _same_training(_dump(accumulated, 0, 2), _dump(single, 0, 2))
    assert not (accumulated / "ranks" / "rank0-step3.safetensors").exists()


def _autoencoder_module(disc_start: int, accumulate: int):
    from autoencoder.lightning import AutoencoderKLTraining
    from ldm.util import load_config

    params = load_config(TINY_AE_CONFIG).model.params
    params.lossconfig.params.disc_start = disc_start
    torch.manual_seed(0)
    return AutoencoderKLTraining(**params, accumulate_grad_batches=accumulate)


def _train_autoencoder(module, batch_size: int, steps: int, run: Path, order=None):
    from ldm.training import build_trainer
    from tests.helpers import TinyCaptionedImages

    data = TinyCaptionedImages(8)
    if order is not None:
        data = torch.utils.data.Subset(data, order)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    trainer = build_trainer(run, max_steps=steps, log_every=1, checkpoint_every=100, enable_progress_bar=False,
                            enable_model_summary=False, automatic_optimization=False, logger="csv")
    torch.manual_seed(1)  # the posterior samples: one draw of [4, ...] equals two draws of [2, ...]
    trainer.fit(module, loader)
    return trainer


def _parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_autoencoder_accumulates_by_hand(tmp_path):
    # discriminator off: 2 x 2 accumulated is one batch of 4 (the losses are batch means)
    big = _autoencoder_module(disc_start=100, accumulate=1)
    small = _autoencoder_module(disc_start=100, accumulate=2)
    _train_autoencoder(big, 4, 1, tmp_path / "big")
    trainer = _train_autoencoder(small, 2, 1, tmp_path / "small")
    assert trainer.global_step == 1
    _same_training(dict(big.autoencoder.state_dict()), dict(small.autoencoder.state_dict()))


def test_autoencoder_discriminator_steps_on_its_window(tmp_path):
    """Discriminator on. Its BatchNorm normalises each micro-batch by its own statistics, so a window is not one big
    batch; but it must step once per window on the sum of exactly that window's micro-batches: swapping the two
    micro-batches changes nothing, replacing one does."""

    def window(order, name):
        module = _autoencoder_module(disc_start=0, accumulate=2)
        forward = module.autoencoder.forward
        module.autoencoder.forward = lambda x, sample_posterior=True: forward(x, sample_posterior=False)
        trainer = _train_autoencoder(module, 2, 1, tmp_path / name, order=order)
        assert trainer.global_step == 1
        assert all(int(state["step"]) == 1 for state in trainer.optimizers[1].state.values())  # one step per window
        return _parameters(module)

    before = _parameters(_autoencoder_module(disc_start=0, accumulate=2))
    ab, ba, aa = window([0, 1, 2, 3], "ab"), window([2, 3, 0, 1], "ba"), window([0, 1, 0, 1], "aa")
    disc = [k for k in ab if k.startswith("loss.discriminator.")]
    assert disc and any(not torch.equal(before[k], ab[k]) for k in disc)
    _same_training(ab, ba)
    moved = torch.cat([(ab[k] - aa[k]).flatten() for k in disc]).abs()
    assert float(moved.mean()) > 1e-5  # the second micro-batch counts


@pytest.mark.slow
def test_autoencoder_on_two_processes_keeps_ranks_equal(tmp_path):
    run = tmp_path / "ae"
    _ok(_ldm(["train-autoencoder", "--config", TINY_AE_CONFIG, "--run-dir", str(run), "--devices", "2",
              "--accumulate-grad-batches", "2", "lightning.accelerator=cpu", "lightning.logger=csv"]))
    assert (run / "autoencoder.safetensors").is_file()
    launch = json.loads((run / "launch.json").read_text())[0]
    assert (launch["processes"], launch["global_batch"]) == (2, 16)


@pytest.mark.slow
def test_two_nodes_on_loopback_with_torchrun(tmp_path, autoencoder_file):
    run = tmp_path / "run"
    port = str(_free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              "-m", "ldm", "train-diffusion", "--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file,
              "--run-dir", str(run), "--num-nodes", "2", "--devices", "1", "--max-steps", "3", *FIXED]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--node-rank", str(rank), *common],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    launch = json.loads((run / "launch.json").read_text())
    assert len(launch) == 1 and (launch[0]["processes"], launch[0]["nodes"]) == (2, 2)
    assert (run / "model.safetensors").is_file()
    rank0, rank1 = _dump(run, 0, 3), _dump(run, 1, 3)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_torchrun_processes_need_one_run_dir(autoencoder_file, monkeypatch):
    from scripts import train_diffusion

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from ldm.run_folder import RunFolderError

    with pytest.raises(RunFolderError, match="same --run-dir"):
        train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, *FIXED])


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_without_a_hang(tmp_path, autoencoder_file):
    run = tmp_path / "run"
    killer = ["data.train.target=tests.helpers.KillSwitchImages", "data.train.params.kill_at=5",
              f"data.train.params.marker={tmp_path / 'killed'}", "data.train.params.kill_rank=1"]
    start = time.monotonic()
    result = _ldm(["train-diffusion", "--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file,
                   "--run-dir", str(run), "--devices", "2", "--max-steps", "50", "lightning.timeout_minutes=1",
                   "lightning.accelerator=cpu", "lightning.val_every=0", "lightning.image_every=0", *killer],
                  timeout=240)
    assert (tmp_path / "killed").exists()
    assert result.returncode != 0
    assert time.monotonic() - start < 200
    assert "terminated" in result.stderr.lower() or "error" in result.stderr.lower()
