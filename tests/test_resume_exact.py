"""A resumed run continues: N steps straight == SIGKILL mid-epoch + --resume, bit for bit, for both stages.

Every run here is a subprocess with one thread (the straight one too), so all of them do the same arithmetic.
The kill is made by the dataset at a fixed item (tests.helpers.KillSwitchImages), not by a timer.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ldm.run_folder import checkpoint_step
from tests.helpers import TINY_DIFFUSION_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AUTOENCODER_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny-autoencoder.yaml")
KILLER = "tests.helpers.KillSwitchImages"


def _run(script, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *map(str, args)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def _straight_and_resumed(tmp_path, script, config, steps, kill_at, options=(), train_node="data.params.train"):
    common = [f"lightning.max_steps={steps}", "lightning.checkpoint_every=3"]
    _run(script, "--config", config, "--run-dir", tmp_path / "straight", *options, *common)

    marker = tmp_path / "killed"
    killer = [f"{train_node}.target={KILLER}", f"{train_node}.params.kill_at={kill_at}",
              f"{train_node}.params.marker={marker}"]
    first = _run(script, "--config", config, "--run-dir", tmp_path / "resumed", *options, *common, *killer,
                 check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists(), first.stderr[-2000:]
    step = checkpoint_step(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert 0 < step < steps and step % 4 != 0, f"killed at step {step}: not mid-epoch (4 batches an epoch)"
    _run(script, "--resume", tmp_path / "resumed", "--allow-target", KILLER,
         "--allow-target", "tests.helpers.TinyCaptionedImages", *options)
    return tmp_path / "straight", tmp_path / "resumed"


def _assert_same_checkpoints(straight, resumed, steps):
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for key, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][name])), name


@pytest.mark.slow
@pytest.mark.parametrize("memo", [False, True], ids=["encode", "latent-memo"])
def test_diffusion_resume_after_sigkill_is_bit_exact(tmp_path, autoencoder_file, memo):
    # With the latent memo the resumed run starts with an empty memo where the straight one had every image of
    # the first epoch in it: the moments must not depend on when (in which batch) an image was encoded.
    steps = 10
    straight, resumed = _straight_and_resumed(
        tmp_path, "train_diffusion.py", TINY_DIFFUSION_CONFIG, steps, kill_at=29,
        options=["--autoencoder", autoencoder_file] + (["trainer.params.latent_memo=64"] if memo else []),
        train_node="data.train")
    _assert_same_checkpoints(straight, resumed, steps)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_autoencoder_resume_after_sigkill_is_bit_exact(tmp_path):
    steps = 10
    straight, resumed = _straight_and_resumed(
        tmp_path, "train_autoencoder.py", TINY_AUTOENCODER_CONFIG, steps, kill_at=29)
    _assert_same_checkpoints(straight, resumed, steps)
    a, b = load_file(straight / "autoencoder.safetensors"), load_file(resumed / "autoencoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
