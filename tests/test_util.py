import os

import pytest
import torch

from ldm.checkpoint import (
    load_config_from_checkpoint,
    load_into,
    load_state_dict,
    read_safetensors_metadata,
    save_safetensors,
)
from ldm.util import ConfigError, instantiate_from_config, load_config


def test_instantiate_builds_target_with_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 5}})
    assert isinstance(layer, torch.nn.Linear)
    assert layer.weight.shape == (5, 3)


def test_unknown_module_names_key_and_target():
    with pytest.raises(ConfigError, match=r"model\.target.*no_such_pkg"):
        instantiate_from_config({"target": "no_such_pkg.Thing"}, path="model")


def test_unknown_attribute_names_key_and_attribute():
    with pytest.raises(ConfigError, match=r"model\.target.*'Linaer'"):
        instantiate_from_config({"target": "torch.nn.Linaer", "params": {}}, path="model")


def test_unknown_parameter_names_key_and_parameter():
    config = {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 5, "bais": False}}
    with pytest.raises(ConfigError, match=r"unet_config\.params\.bais \(did you mean unet_config\.params\.bias\?\)"):
        instantiate_from_config(config, path="unet_config")


def test_missing_parameter_and_missing_target_are_reported():
    with pytest.raises(ConfigError, match="out_features"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3}})
    with pytest.raises(ConfigError, match="no 'target'"):
        instantiate_from_config({"params": {"in_features": 3}}, path="x")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): x.parmas \(did you mean x.params\?\)"):
        instantiate_from_config({"target": "torch.nn.Linear", "parmas": {}}, path="x")


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  target: torch.nn.Linear\n  params:\n    in_features: 2\n    out_features: 4\n")
    config = load_config(path, overrides=["model.params.out_features=7"])
    layer = instantiate_from_config(config.model, path="model")
    assert layer.weight.shape == (7, 2)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_safetensors_round_trip_with_config_and_metadata(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model.state_dict(), config={"a": [1, 2]}, metadata={"scale_factor": 0.5})
    assert load_config_from_checkpoint(path) == {"a": [1, 2]}
    assert float(read_safetensors_metadata(path)["scale_factor"]) == 0.5
    loaded = load_state_dict(path)
    other = torch.nn.Linear(3, 2)
    load_into(other, loaded)
    assert torch.equal(other.weight, model.weight)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_half_precision_export_and_float_reload(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model.state_dict(), dtype=torch.float16)
    loaded = load_state_dict(path)
    assert loaded["weight"].dtype == torch.float16
    other = torch.nn.Linear(3, 2)
    load_into(other, loaded)
    assert other.weight.dtype == torch.float32
    torch.testing.assert_close(other.weight, model.weight, atol=1e-3, rtol=1e-3)


def test_checkpoint_that_does_not_fit_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, torch.nn.Linear(3, 2).state_dict())
    with pytest.raises(ValueError, match=r"shape mismatches.*weight"):
        load_into(torch.nn.Linear(4, 2), load_state_dict(path), what="unet")
    with pytest.raises(ValueError, match=r"1 missing"):
        load_into(torch.nn.Sequential(torch.nn.Linear(3, 2)), {"0.weight": torch.zeros(2, 3)})


def test_pickle_checkpoint_is_loaded_without_unpickling_code(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_state_dict(good)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(bad)


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    from ldm.checkpoint import atomic_write

    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"w": torch.ones(2)})

    def write_half_then_crash(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, write_half_then_crash)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
