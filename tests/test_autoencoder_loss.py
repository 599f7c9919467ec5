"""LPIPSWithDiscriminator: NLL/KL terms, adaptive GAN weight, GAN losses, LPIPS construction without downloads."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from autoencoder import AutoencoderKL
from autoencoder.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from autoencoder.losses import (
    LPIPSWithDiscriminator,
    PerceptualLoss,
    PerceptualWeightsUnavailable,
    adaptive_gan_weight,
    adopt_weight,
    backbone_cache_path,
    gaussian_nll,
)

TINY = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def _model_and_batch(dtype=torch.float64):
    torch.manual_seed(0)
    model = AutoencoderKL(TINY, embed_dim=4).to(dtype)
    x = (torch.rand(2, 3, 16, 16, dtype=dtype) * 2 - 1)
    return model, x


def test_adaptive_weight_equals_ratio_of_gradient_norms():
    model, x = _model_and_batch()
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2).to(torch.float64).eval()
    for m in disc.modules():  # larger weights than the DCGAN init, so the ratio stays below the 1e4 clamp
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.5)
    last = model.get_last_layer()

    def losses():
        rec, post = model(x, generator=torch.Generator().manual_seed(0))
        nll = torch.abs(x - rec).sum() / x.shape[0]
        g = -disc(rec).mean()
        return nll, g

    # independent: two separate backward passes into .grad
    nll, _ = losses()
    model.zero_grad()
    nll.backward()
    grad_nll = last.grad.detach().clone()
    _, g = losses()
    model.zero_grad()
    g.backward()
    grad_g = last.grad.detach().clone()
    ratio = grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert 1e-3 < ratio < 1e4  # inside the clamp range, so the formula itself is checked
    expected = ratio * 0.5

    nll, g = losses()
    weight = adaptive_gan_weight(nll, g, last, disc_weight=0.5)
    torch.testing.assert_close(weight, expected, rtol=1e-9, atol=0)
    assert not weight.requires_grad


def test_adaptive_weight_is_clamped():
    w = torch.ones(3, requires_grad=True)
    nll = (w * 1e6).sum()
    g = (w * 1e-12).sum()
    assert adaptive_gan_weight(nll, g, w, disc_weight=1.0).item() == pytest.approx(1e4)


def test_generator_loss_terms_match_their_definitions():
    model, x = _model_and_batch()
    loss_fn = LPIPSWithDiscriminator(disc_start=0, kl_weight=1e-3, perceptual_weight=0.0, disc_weight=0.5,
                                     logvar_init=0.3, disc_ndf=8, disc_num_layers=2).to(torch.float64)
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    loss, log = loss_fn(x, rec, post, 0, global_step=10, last_layer=model.get_last_layer())
    # independent recomputation
    rec_err = (x - rec).abs()
    nll = (rec_err / torch.exp(torch.tensor(0.3, dtype=torch.float64)) + 0.3).sum() / 2
    kl = (0.5 * (post.mean**2 + post.var - 1 - post.logvar)).sum() / 2
    g = -loss_fn.discriminator(rec).mean()
    d_weight = log["train/d_weight"]
    assert d_weight > 0
    torch.testing.assert_close(log["train/nll_loss"], nll.detach())
    torch.testing.assert_close(log["train/kl_loss"], kl.detach())
    torch.testing.assert_close(loss, nll + 1e-3 * kl + d_weight * g)


def test_discriminator_is_off_before_disc_start():
    model, x = _model_and_batch()
    loss_fn = LPIPSWithDiscriminator(disc_start=100, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2).double()
    rec, post = model(x)
    loss, log = loss_fn(x, rec, post, 0, global_step=99, last_layer=model.get_last_layer())
    assert log["train/disc_factor"].item() == 0.0 and log["train/g_loss"].item() == 0.0
    torch.testing.assert_close(loss, log["train/nll_loss"] + 1e-6 * log["train/kl_loss"])
    d_loss, _ = loss_fn(x, rec, post, 1, global_step=99)
    assert d_loss.item() == 0.0
    assert not loss_fn.discriminator_active(99) and loss_fn.discriminator_active(100)


def test_gaussian_nll_and_adopt_weight():
    rec = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    logvar = torch.tensor(0.5, dtype=torch.float64)
    nll, weighted = gaussian_nll(rec, logvar, weights=torch.full_like(rec, 2.0))
    expected = sum(r / torch.exp(logvar) + logvar for r in rec.flatten()) / 2
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(weighted, 2 * expected)
    assert adopt_weight(1.0, 5, threshold=6) == 0.0 and adopt_weight(1.0, 6, threshold=6) == 1.0


def test_gan_losses_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(hinge)
    vanilla = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla.item())


def test_patchgan_output_shape():
    disc = NLayerDiscriminator(3, ndf=8, n_layers=3)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert set(k.split(".")[0] for k in disc.state_dict()) == {"main"}


def test_random_backbone_lpips_needs_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: any download attempt would land here
    loss = PerceptualLoss(backbone="random", net="vgg")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    d = loss(x, y)
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)
    assert torch.allclose(loss(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.lpips.training  # dropout in the lpips heads stays off
    torch.testing.assert_close(loss(x, y), d)
    assert not any(tmp_path.rglob("*.pth"))
    # the linear heads came from the lpips package (not random): they are non-negative calibrated weights
    assert all((lin.model[-1].weight >= 0).all() for lin in loss.lpips.lins)


def test_missing_pretrained_backbone_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected_path = os.path.join(str(tmp_path), "hub", "checkpoints", "vgg16-397923af.pth")
    assert backbone_cache_path("vgg") == expected_path
    start = time.perf_counter()
    with pytest.raises(PerceptualWeightsUnavailable) as info:
        LPIPSWithDiscriminator(disc_start=1, perceptual_weight=1.0, perceptual_backbone="pretrained")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert expected_path in message and "perceptual_weight=0" in message


def test_present_pretrained_backbone_is_not_refused(tmp_path, monkeypatch):
    from autoencoder.losses import check_pretrained_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = backbone_cache_path("vgg")
    os.makedirs(os.path.dirname(path))
    open(path, "wb").close()
    check_pretrained_backbone("vgg")  # the file exists: no error, no network probe


def test_perceptual_weight_zero_builds_no_lpips(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loss = LPIPSWithDiscriminator(perceptual_weight=0.0, perceptual_backbone="pretrained", use_discriminator=False)
    assert loss.perceptual_loss is None and loss.discriminator is None


def test_perceptual_term_enters_reconstruction_loss():
    loss_fn = LPIPSWithDiscriminator(perceptual_weight=2.0, perceptual_backbone="random", perceptual_net="squeeze",
                                     use_discriminator=False)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    rec = loss_fn.reconstruction_loss(x, y)
    p = loss_fn.perceptual_loss(x, y)
    torch.testing.assert_close(rec, (x - y).abs() + 2.0 * p)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_loss="wasserstein", perceptual_weight=0)
    with pytest.raises(ValueError, match="perceptual_backbone"):
        LPIPSWithDiscriminator(perceptual_backbone="imagenet", perceptual_weight=1)
    with pytest.raises(ValueError, match="optimizer_idx"):
        LPIPSWithDiscriminator(perceptual_weight=0)(torch.zeros(1), torch.zeros(1), None, 2, 0)


def test_l2_pixel_loss_option():
    loss_fn = LPIPSWithDiscriminator(perceptual_weight=0.0, use_discriminator=False, pixel_loss="l2")
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    y = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(loss_fn.reconstruction_loss(x, y), (x - y) ** 2)
    with pytest.raises(ValueError, match="pixel_loss"):
        LPIPSWithDiscriminator(perceptual_weight=0.0, pixel_loss="huber")
