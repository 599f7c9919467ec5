"""Files from strangers never run code: config targets from weights metadata or run folders must be on the allow-list.

A real safetensors file (no pickle anywhere) whose metadata config names ``os.system`` is handed to every loader and
script that reads one; each must refuse it with an error naming the target and the file, and the command must
never run (its marker file is never created).
"""

import json
import os
import shlex

import pytest
import torch
import yaml
from safetensors.torch import save_file

from autoencoder import load_autoencoder
from autoencoder.io import read_data_config
from ldm.checkpoint import load_config_from_checkpoint, read_safetensors_metadata
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.util import (
    DEFAULT_ALLOWED_TARGETS,
    ConfigError,
    UntrustedTargetError,
    allow_target,
    allowed_targets,
    check_targets,
    get_obj_from_str,
    instantiate_from_config,
    iter_targets,
    load_config,
)
from tests.helpers import TINY_DIFFUSION_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hostile_node(marker, target="os.system"):
    return {"target": target, "params": {"command": f"touch {shlex.quote(str(marker))}"}}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a config target from a file ran a command"


@pytest.fixture
def hostile_autoencoder(tmp_path, marker):
    path = tmp_path / "hostile-ae.safetensors"
    save_file({"w": torch.zeros(1)}, str(path),
              metadata={"config": json.dumps(_hostile_node(marker)), "scale_factor": "0.5"})
    return str(path)


@pytest.fixture
def hostile_model(tmp_path, marker, autoencoder_file):
    """A whole-model file: every node fine except the UNet, which names os.system (nested, not at the top)."""
    model_config = yaml.safe_load(open(TINY_DIFFUSION_CONFIG))["model"]
    config = {**model_config, "autoencoder": load_config_from_checkpoint(autoencoder_file), "scale_factor": 0.5,
              "unet": _hostile_node(marker)}
    path = tmp_path / "hostile-model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"config": json.dumps(config), "scale_factor": "0.5"})
    return str(path)


@pytest.fixture
def hostile_data_config(tmp_path, marker, autoencoder_file):
    """A genuine autoencoder file whose stored data config names os.system."""
    meta = read_safetensors_metadata(autoencoder_file)
    meta["data_config"] = json.dumps({"params": {"batch_size": 2, "train": _hostile_node(marker)}})
    from safetensors.torch import load_file

    path = tmp_path / "hostile-data.safetensors"
    save_file(load_file(autoencoder_file), str(path), metadata=meta)
    return str(path)


@pytest.fixture
def hostile_run(tmp_path, marker):
    """A run folder whose config.yaml names os.system as the trainer."""
    config = yaml.safe_load(open(TINY_DIFFUSION_CONFIG))
    config["trainer"] = _hostile_node(marker)
    run = tmp_path / "hostile-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"global_step": 1, "state_dict": {}}, run / "checkpoints" / "last.ckpt")
    return run


def _refused(call, path):
    with pytest.raises(UntrustedTargetError) as info:
        call()
    message = str(info.value)
    assert "'os.system'" in message and str(path) in message and "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ the library


def test_library_loaders_refuse_a_hostile_target(hostile_autoencoder, hostile_model, hostile_data_config):
    _refused(lambda: load_autoencoder(hostile_autoencoder), hostile_autoencoder)
    _refused(lambda: LatentDiffusion.from_checkpoint(hostile_model), hostile_model)
    message = _refused(lambda: load_config_from_checkpoint(hostile_model), hostile_model)
    assert "metadata.config.unet.target" in message  # says where in the config it sits
    _refused(lambda: read_data_config(hostile_data_config), hostile_data_config)


def test_a_run_folder_config_is_checked_but_the_users_own_is_free(hostile_run, marker, tmp_path):
    _refused(lambda: load_config(hostile_run / "config.yaml", trusted=False), hostile_run / "config.yaml")
    # the user's own YAML stays theirs: no allow-list (built from a harmless standard-library class here)
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"thing": {"target": "collections.OrderedDict", "params": {}}}))
    assert instantiate_from_config(load_config(own).thing) == {}


def test_the_allow_list_matches_whole_names_and_can_be_extended_on_purpose(tmp_path):
    for sneaky in ("ldm.util.os.system", "ldm.diffusion.NoiseSchedule.__init__.__globals__", "os.system",
                   "ldm.diffusion.NoiseSchedulex", "builtins.eval"):
        with pytest.raises(UntrustedTargetError):
            check_targets({"model": {"target": sneaky}}, "file.safetensors")
    check_targets({"a": [{"target": "ldm.diffusion.NoiseSchedule"}]}, "file")  # in a list too
    assert list(iter_targets({"a": [{"target": "x.y"}], "b": {"target": "p.q"}})) == [
        ("config.a[0].target", "x.y"), ("config.b.target", "p.q")]

    assert "tests.helpers.Nowhere" not in allowed_targets()
    allow_target("tests.helpers.Nowhere")
    check_targets({"target": "tests.helpers.Nowhere"}, "file")
    with pytest.raises(ValueError, match="dotted name"):
        allow_target("os; rm -rf /")


def test_every_shipped_config_target_is_allowed_and_every_allowed_name_exists():
    for name in DEFAULT_ALLOWED_TARGETS:
        assert callable(get_obj_from_str(name)), name
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        if os.path.basename(folder) == "stable-diffusion":
            continue  # SD's own files: their class names are mapped by ldm.interop, never built (test_interop_*)
        for file in files:
            path = os.path.join(folder, file)
            check_targets(load_config(path), path)


def test_the_shipped_demo_weights_load_under_the_allow_list():
    from ldm.assets import DEMO_CHECKPOINT

    check_targets(load_config_from_checkpoint(DEMO_CHECKPOINT), DEMO_CHECKPOINT)


# ------------------------------------------------------------------------------------------------ every script


def test_scripts_refuse_hostile_weights(hostile_autoencoder, hostile_model, hostile_data_config, hostile_run,
                                        autoencoder_file, tmp_path):
    from scripts import (
        compute_scale_factor,
        evaluate,
        evaluate_autoencoder,
        export_diffusion,
        layout_leak,
        train_autoencoder,
        train_diffusion,
        txt2img,
    )

    out = tmp_path / "out"
    _refused(lambda: txt2img.main(["--prompt", "a red circle", "--ckpt", hostile_model, "--outdir", str(out)]),
             hostile_model)
    _refused(lambda: evaluate.main(["--ckpt", hostile_model, "--no-progress"]), hostile_model)
    _refused(lambda: layout_leak.main(["--ckpt", hostile_model]), hostile_model)
    _refused(lambda: train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--init-from", hostile_model,
                                           "--run-dir", str(tmp_path / "r1")]), hostile_model)
    _refused(lambda: train_diffusion.main(["--config", TINY_DIFFUSION_CONFIG, "--autoencoder", hostile_autoencoder,
                                           "--run-dir", str(tmp_path / "r2")]), hostile_autoencoder)
    _refused(lambda: export_diffusion.main(["--run", str(hostile_run), "--autoencoder", autoencoder_file]),
             hostile_run / "config.yaml")
    _refused(lambda: evaluate_autoencoder.main(["--ckpt", hostile_autoencoder]), hostile_autoencoder)
    _refused(lambda: compute_scale_factor.main(["--ckpt", hostile_autoencoder]), hostile_autoencoder)
    _refused(lambda: compute_scale_factor.main(["--ckpt", hostile_data_config]), hostile_data_config)
    _refused(lambda: evaluate_autoencoder.main(["--ckpt", hostile_data_config]), hostile_data_config)
    _refused(lambda: train_autoencoder.main(["--resume", str(hostile_run)]), hostile_run / "config.yaml")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_allow_target_flag_lets_a_trusted_class_through(tmp_path, marker):
    """--allow-target is the user's explicit say-so: the named class is then built from the file's config."""
    from scripts import compute_scale_factor

    path = tmp_path / "custom.safetensors"
    save_file({"w": torch.zeros(1)}, str(path),
              metadata={"config": json.dumps({"target": "collections.OrderedDict", "params": {}})})
    with pytest.raises(UntrustedTargetError):
        compute_scale_factor.main(["--ckpt", str(path)])
    # allowed: now it is built, and fails for the honest reason that it is no autoencoder
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        compute_scale_factor.main(["--ckpt", str(path), "--allow-target", "collections.OrderedDict"])
    with pytest.raises(ConfigError):
        check_targets({"target": "collections.Counter"}, path)
