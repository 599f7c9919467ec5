import os

# Tests never download weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The commands set torch's threads at start (ldm/threads.py); the tests' tensors are tiny: one thread.
os.environ.setdefault("LDM_THREADS", "1")

import pytest
import torch


# The tests' own datasets appear in run folders' config.yaml; a user adds their classes the same way.
from ldm.util import allow_target  # noqa: E402

allow_target("tests.helpers.TinyCaptionedImages", "tests.helpers.FixedNoiseImages", "tests.helpers.FixedNoiseTrainer")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def autoencoder_file(tmp_path_factory):
    """A random tiny stage-one autoencoder file with scale factor 0.7."""
    from tests.helpers import make_tiny_autoencoder_file

    return make_tiny_autoencoder_file(tmp_path_factory.mktemp("ae") / "autoencoder.safetensors", scale_factor=0.7)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, autoencoder_file):
    """The real diffusion training script run for 4 steps on the tiny config: (weights path, run dir)."""
    from scripts import train_diffusion
    from tests.helpers import TINY_DIFFUSION_CONFIG

    run_dir = tmp_path_factory.mktemp("run")
    weights = train_diffusion.main(
        ["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", autoencoder_file, "--run-dir", str(run_dir)]
    )
    return weights, run_dir


@pytest.fixture(scope="session", autouse=True)
def _single_intra_op_thread():
    """The tests' tensors are tiny: one intra-op thread. With two, OpenMP threads spin-waiting on each other on a
    busy 2-core machine made small ops up to 100x slower; one thread costs next to nothing at these sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
