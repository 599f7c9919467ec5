"""FID and KID (ldm/eval/fid.py): the distances against independent float64 computations, their behaviour on
images with random-weight feature networks, the offline Inception loader, the errors, and evaluate --fid."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ldm.data.shapes import ShapesDataset
from ldm.eval import fid
from ldm.eval.fid import (
    FeatureExtractorError,
    InceptionWeightsNotFound,
    distribution_scores,
    extract_features,
    frechet_distance,
    inception_features,
    kernel_distance,
    load_feature_extractor,
    load_real_images,
    random_inception_state_dict,
)


def tiny_features() -> nn.Module:
    """A random-weight conv net (seeded): images [N, 3, H, W] in [0, 1] -> [N, 32]. Named on the command line by
    the CLI test as ``tests.test_fid:tiny_features``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten())


def not_a_network():
    return 42


def plain_function():
    """Returns a plain function, not a module: wrapped by the loader."""
    return lambda images: images.mean(dim=(2, 3))


def _shapes(count: int, offset: int = 0) -> torch.Tensor:
    data = ShapesDataset("validation", num_samples=offset + count)
    return torch.stack([data[offset + i]["image"] for i in range(count)])


# -- the distances --------------------------------------------------------------------------------------------------


def test_frechet_distance_equals_the_closed_form_with_scipy_sqrtm():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(80, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator,
                                                                                         dtype=torch.float64)
    fake = torch.randn(70, 6, generator=generator, dtype=torch.float64) * 1.5 + 0.4
    mu_r, mu_f = real.mean(0).numpy(), fake.mean(0).numpy()
    cov_r, cov_f = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(cov_r @ cov_f).real
    expected = float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * root))
    assert math.isclose(frechet_distance(real, fake), expected, rel_tol=1e-9)


def test_kernel_distance_equals_the_mmd_estimator_written_out():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    fake = torch.randn(40, 5, generator=generator, dtype=torch.float64) + 0.5
    m, d = 40, 5
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    expected = ((kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                - 2 * kxy.sum() / m**2)
    mean, std = kernel_distance(real, fake, subsets=3, subset_size=m)  # whole sets: every subset the same
    assert math.isclose(mean, float(expected), rel_tol=1e-10) and std < 1e-12


def test_kid_subsets_are_reproducible_and_leave_the_global_rng_alone():
    real, fake = torch.randn(30, 4), torch.randn(30, 4) + 1
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    first = kernel_distance(real, fake, subsets=10, seed=3)
    assert torch.equal(torch.rand(1), before)
    assert kernel_distance(real, fake, subsets=10, seed=3) == first
    assert kernel_distance(real, fake, subsets=10, seed=4) != first
    assert first[1] > 0  # default subsets are half the set: they differ


def test_distribution_scores_errors():
    with pytest.raises(ValueError, match="unknown metrics"):
        distribution_scores(torch.randn(5, 2), torch.randn(5, 2), metrics=("fid", "is"))
    with pytest.raises(ValueError, match="differ in width"):
        frechet_distance(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.randn(5, 2), torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="subset size"):
        kernel_distance(torch.randn(5, 2), torch.randn(9, 2), subset_size=6)


# -- on images, with random-weight feature networks -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shape_images():
    return _shapes(96), _shapes(96, offset=96)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(shape_images):
    real, other = shape_images
    network = tiny_features()
    real_features = extract_features(network, real)
    assert abs(frechet_distance(real_features, real_features)) < 1e-6 * frechet_distance(
        real_features, extract_features(network, other + 0.5 * torch.randn_like(other)))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(other.shape, generator=generator)
    fids, kids = [], []
    for level in (0.0, 0.3, 0.6, 1.2):
        fake = extract_features(network, (other + level * noise).clamp(-1, 1))
        scores = distribution_scores(real_features, fake, kid_subsets=50)
        fids.append(scores["fid"])
        kids.append(scores["kid"]["mean"])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    # an independent set of the same distribution: KID's unbiased estimate is about 0, the noisy ones far above
    assert abs(kids[0]) < 0.1 * kids[-1]


def test_fid_with_the_demo_autoencoder_fallback_sees_the_shift(shape_images):
    real, other = shape_images
    network = fid.demo_autoencoder_features()
    assert "not a standard FID" in network.description
    real_features = extract_features(network, real)
    same = frechet_distance(real_features, extract_features(network, other))
    recoloured = frechet_distance(real_features, extract_features(network, other.flip(1)))  # RGB -> BGR
    assert real_features.shape == (96, 64) and same < recoloured


def test_extractor_returning_no_features_is_named():
    class Bad(nn.Module):
        description = "bad-net"

        def forward(self, images):
            return images.mean(dim=(2, 3, 1))

    with pytest.raises(FeatureExtractorError, match=r"bad-net returned \(4,\)"):
        extract_features(Bad(), torch.zeros(4, 3, 8, 8))


# -- the Inception network from a local file ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_state():
    return random_inception_state_dict(seed=7)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_inception_loads_a_local_file_through_the_real_code(inception_state, tmp_path, suffix, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / f"inception{suffix}"
    if suffix == ".pth":
        torch.save(inception_state, path)
    else:
        save_file({k: v.contiguous() for k, v in inception_state.items()}, str(path))
    network = inception_features(str(path))
    loaded = network.inception.state_dict()
    assert set(loaded) == set(inception_state)
    assert all(torch.equal(loaded[k], inception_state[k]) for k in inception_state)
    assert not network.inception.training and path.name in network.description
    images = torch.rand(2, 3, 32, 32)
    features = network(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    # FID's input is the 8-bit image: pixels that round to the same byte give the same features
    quantised = (images * 255).round() / 255
    torch.testing.assert_close(network(quantised + 0.4 / 255), network(quantised), rtol=0, atol=0)
    monkeypatch.setenv(fid.INCEPTION_WEIGHTS_ENV, str(path))  # the environment variable finds it too
    torch.testing.assert_close(inception_features()(images), features, rtol=0, atol=0)


def test_inception_file_with_other_weights_is_named(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(FeatureExtractorError, match=r"resnet\.pth: not the FID Inception-v3 weights"):
        inception_features(str(path))


class _Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse a file holding it."""


def test_inception_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "object": _Payload()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: torch.load\(weights_only=True\) refused it"):
        inception_features(str(path))


def test_missing_inception_file_says_which_file_and_how_to_give_it(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsNotFound) as info:
        inception_features()
    message = str(info.value)
    assert "\n" not in message
    for needed in ("pt_inception-2015-12-05-6726825d.pth", "--inception-weights", "LDM_INCEPTION_WEIGHTS",
                   "nothing is downloaded", "--feature-extractor"):
        assert needed in message
    with pytest.raises(InceptionWeightsNotFound, match=r"nowhere\.pth does not exist"):
        inception_features(str(tmp_path / "nowhere.pth"))


# -- --feature-extractor module:callable ----------------------------------------------------------------------------


def test_feature_extractor_from_a_name(monkeypatch):
    network = load_feature_extractor("tests.test_fid:tiny_features")
    assert network.description == "tests.test_fid:tiny_features" and not network.training
    assert extract_features(network, torch.zeros(3, 3, 16, 16)).shape == (3, 32)
    wrapped = load_feature_extractor("tests.test_fid:plain_function")
    assert isinstance(wrapped, nn.Module) and extract_features(wrapped, torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    for spec, match in [("tests.test_fid", "expected module.path:callable"),
                        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                        ("tests.test_fid:nothing", "has no attribute 'nothing'"),
                        ("tests.test_fid:not_a_network", "returned int")]:
        with pytest.raises(FeatureExtractorError, match=match):
            load_feature_extractor(spec)


def test_feature_extractor_named_in_a_file_obeys_the_allow_list(monkeypatch):
    import ldm.util
    from ldm.util import UntrustedTargetError, allow_target

    monkeypatch.setattr(ldm.util, "_extra_allowed_targets", set())
    with pytest.raises(UntrustedTargetError, match=r"eval\.yaml: .*tests\.test_fid\.tiny_features.*--allow-target"):
        load_feature_extractor("tests.test_fid:tiny_features", trusted=False, source="eval.yaml")
    allow_target("tests.test_fid.tiny_features")
    assert isinstance(load_feature_extractor("tests.test_fid:tiny_features", trusted=False, source="eval.yaml"),
                      nn.Module)


# -- real images from a folder and the evaluate command -------------------------------------------------------------


def _write_real_folder(folder, count=12, size=64):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = _shapes(count, offset=500)
    for k, image in enumerate(images):
        array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).resize((size, size), Image.NEAREST).save(folder / f"{k:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    return images


def test_load_real_images_resizes_and_reads_every_image(tmp_path):
    originals = _write_real_folder(tmp_path / "real", count=5, size=128)
    images = load_real_images(tmp_path / "real", size=64)
    assert images.shape == (5, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert (images - originals).abs().mean() < 0.05  # 128 px nearest-upscaled, resized back
    with pytest.raises(FileNotFoundError):
        load_real_images(tmp_path / "missing", size=64)


def test_evaluate_fid_end_to_end(trained, tmp_path, capsys):
    from scripts import evaluate

    weights, _ = trained
    _write_real_folder(tmp_path / "real", count=12, size=16)
    out = tmp_path / "eval.json"
    result = evaluate.main(["--ckpt", weights, "--steps", "2", "--categories", "single", "--no-progress",
                            "--fid", str(tmp_path / "real"), "--feature-extractor", "tests.test_fid:tiny_features",
                            "--json", str(out), "--kid-subsets", "5"])
    assert result["fid"] > 0 and set(result["kid"]) == {"mean", "std", "subset_size", "subsets"}
    printed = capsys.readouterr().out
    assert "FID" in printed and "KID" in printed and "12 real, 24 generated" in printed
    report = json.loads(out.read_text())["distribution"]
    assert report["n_real"] == 12 and report["n_generated"] == 24 and report["kid"]["subset_size"] == 6
    assert report["features"] == "tests.test_fid:tiny_features"
    only_fid = evaluate.main(["--ckpt", weights, "--steps", "2", "--categories", "single", "--no-progress",
                              "--fid", str(tmp_path / "real"), "--feature-extractor", "tests.test_fid:tiny_features",
                              "--metrics", "fid"])
    assert "kid" not in only_fid and math.isclose(only_fid["fid"], result["fid"], rel_tol=1e-9)
    rows = evaluate.main(["--ckpt", weights, "--sweep", "--sweep-steps", "1", "--sweep-samplers", "ddim",
                          "--categories", "single", "--no-progress", "--out-dir", str(tmp_path / "sweep"),
                          "--fid", str(tmp_path / "real"), "--feature-extractor", "tests.test_fid:tiny_features",
                          "--kid-subsets", "5"])["sweep"]
    assert rows[0]["fid"] > 0 and "FID" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_evaluate_fid_errors_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from ldm.cli import run
    from scripts import evaluate

    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    loaded = []
    monkeypatch.setattr(evaluate.LatentDiffusion, "from_checkpoint", lambda *a, **k: loaded.append(a))
    (tmp_path / "real").mkdir()
    cases = [
        (["--fid", str(tmp_path / "real")], "pt_inception-2015-12-05-6726825d.pth"),
        (["--fid", str(tmp_path / "real"), "--inception-weights", str(tmp_path / "x.pth")], "x.pth does not exist"),
        (["--metrics", "fid"], "needs --fid REAL_DIR"),
        (["--fid", str(tmp_path / "real"), "--metrics", "fid,is"], "choose from fid,kid"),
        (["--fid", str(tmp_path / "nope")], "no such folder of real images"),
        (["--fid", str(tmp_path / "real"), "--feature-extractor", "nomodule_q:f"], "cannot import module"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as stop:
            run(evaluate.main, argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err
    assert loaded == []
