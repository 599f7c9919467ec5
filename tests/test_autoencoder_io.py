"""Autoencoder weights files: safetensors round trip with config + scale_factor, metadata rewrite, latent statistics."""

import json

import pytest
import torch

from autoencoder import AutoencoderKL, load_autoencoder, read_scale_factor, save_autoencoder, write_scale_factor
from autoencoder.io import update_metadata
from autoencoder.scale import latent_statistics, scale_factor_from_std
from ldm.checkpoint import read_safetensors_metadata, save_safetensors

TINY = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return AutoencoderKL(TINY, embed_dim=3).eval()


def test_round_trip_with_config_and_scale_factor(tmp_path, model):
    path = tmp_path / "ae.safetensors"
    save_autoencoder(path, model, scale_factor=0.5432, metadata={"data_config": {"batch_size": 4}})
    meta = read_safetensors_metadata(path)
    assert json.loads(meta["config"]) == {"target": "autoencoder.AutoencoderKL",
                                          "params": {"ddconfig": TINY, "embed_dim": 3}}
    assert float(meta["scale_factor"]) == 0.5432
    assert json.loads(meta["data_config"]) == {"batch_size": 4}

    loaded, scale = load_autoencoder(path)
    assert scale == 0.5432 and isinstance(loaded, AutoencoderKL) and not loaded.training
    assert loaded.embed_dim == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sample_posterior=False)[0], model(x, sample_posterior=False)[0])


def test_write_scale_factor_rewrites_metadata_only(tmp_path, model):
    path = tmp_path / "ae.safetensors"
    save_autoencoder(path, model, metadata={"note": "keep me"})
    assert read_scale_factor(path) is None
    with pytest.raises(ValueError, match="compute_scale_factor"):
        load_autoencoder(path)
    assert load_autoencoder(path, require_scale_factor=False)[1] is None

    write_scale_factor(path, 0.25, latent_mean=0.1, latent_std=4.0)
    meta = read_safetensors_metadata(path)
    assert float(meta["scale_factor"]) == 0.25 and float(meta["latent_std"]) == 4.0
    assert meta["note"] == "keep me" and "config" in meta
    loaded, scale = load_autoencoder(path)
    assert scale == 0.25
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ae.safetensors"]  # no temp files left
    with pytest.raises(ValueError, match="positive"):
        write_scale_factor(path, float("nan"))


def test_failed_rewrite_keeps_the_original(tmp_path, model, monkeypatch):
    import autoencoder.io as io

    path = tmp_path / "ae.safetensors"
    save_autoencoder(path, model, scale_factor=1.5)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"torn")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError):
        update_metadata(path, {"scale_factor": "2.0"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ae.safetensors"]


def test_load_reports_mismatched_weights(tmp_path, model):
    state = model.state_dict()
    state.pop("quant_conv.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, state, config=model.model_config(), metadata={"scale_factor": "1.0"})
    with pytest.raises(ValueError, match=r"quant_conv\.bias") as info:
        load_autoencoder(path)
    assert "extra.weight" in str(info.value)


def test_load_without_config_is_an_error(tmp_path, model):
    path = tmp_path / "noconfig.safetensors"
    save_safetensors(path, model.state_dict())
    with pytest.raises(ValueError, match="config"):
        load_autoencoder(path)
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "missing.safetensors")


def test_latent_statistics_match_a_direct_computation(model):
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(3, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    stats = latent_statistics(model, [{"image": b} for b in batches], num_batches=2,
                              generator=torch.Generator().manual_seed(5))
    sample_gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z = torch.cat([model.encode(b).sample(generator=sample_gen).flatten() for b in batches[:2]]).double()
    assert stats.count == z.numel() == 2 * 3 * 3 * 8 * 8
    assert stats.mean == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-7)
    assert stats.std == pytest.approx(z.std().item(), rel=1e-5)
    assert stats.scale_factor == pytest.approx(1 / z.std().item(), rel=1e-5)
    with pytest.raises(ValueError):
        scale_factor_from_std(0.0)
    with pytest.raises(ValueError, match="no batches"):
        latent_statistics(model, [])
