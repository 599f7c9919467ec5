"""The in-memory latent memo: moments equal to a batch-1 encode, counted hits, LRU bound, the trainer's loss."""

import pytest
import torch

from ldm.data.latent_memo import LatentMemo, image_key
from ldm.models.diffusion_trainer import DiffusionTrainer
from tests.helpers import TinyCaptionedImages
from tests.test_latent_diffusion import build_tiny_model


@pytest.fixture
def model(autoencoder_file):
    return build_tiny_model(autoencoder_file)


def _images(n: int) -> torch.Tensor:
    data = TinyCaptionedImages(num_samples=n)
    return torch.stack([data[i]["image"] for i in range(n)])


def test_moments_are_each_images_own_batch1_encoding(model):
    encode = model.first_stage_model.encode
    images = torch.randn(5, 3, 16, 16)
    memo = LatentMemo(16)
    mean, std = memo(images, encode)
    assert mean.shape == std.shape == (5, 4, 8, 8)
    for i in range(5):  # independent of the batch the image came in (or its place in it)
        alone = encode(images[i : i + 1])
        assert torch.equal(mean[i], alone.mean[0]) and torch.equal(std[i], alone.std[0])
    batched = encode(images)
    torch.testing.assert_close(mean, batched.mean, rtol=1e-5, atol=1e-5)
    assert (memo.hits, memo.misses, len(memo)) == (0, 5, 5)


def test_repeated_images_are_hits_and_others_misses(model):
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        return model.first_stage_model.encode(x)

    memo = LatentMemo(16)
    images = _images(6)  # three distinct squares, twice each
    mean, _ = memo(images, encode)
    assert calls == [1, 1, 1] and (memo.hits, memo.misses) == (3, 3)
    assert torch.equal(mean[0], mean[3]) and not torch.equal(mean[0], mean[1])
    noise = torch.randn(1, 3, 16, 16)
    memo(torch.cat([noise, noise.flip(-1)]), encode)  # a flipped image is another image
    assert memo.misses == 5 and memo.hit_rate == pytest.approx(3 / 8)


def test_least_recently_used_entry_is_dropped_beyond_max_entries(model):
    encode = model.first_stage_model.encode
    a, b, c = torch.randn(3, 1, 3, 16, 16)
    memo = LatentMemo(2)
    memo(a, encode), memo(b, encode), memo(a, encode)  # a is now the most recent
    memo(c, encode)  # evicts b
    assert len(memo) == 2
    misses = memo.misses
    memo(a, encode)
    assert memo.misses == misses
    memo(b, encode)
    assert memo.misses == misses + 1


def test_keys_see_values_dtype_and_shape():
    x = torch.zeros(3, 4, 4)
    assert image_key(x) == image_key(x.clone())
    assert image_key(x) != image_key(x.to(torch.float64))
    assert image_key(x) != image_key(x.reshape(3, 2, 8))
    y = x.clone()
    y[0, 0, 0] = 1e-7
    assert image_key(x) != image_key(y)


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="max_entries"):
        LatentMemo(0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        LatentMemo(4)(torch.zeros(3, 16, 16), model.first_stage_model.encode)


def test_trainer_loss_with_the_memo_equals_the_loss_without_it(autoencoder_file):
    batch = {"image": _images(6), "caption": ["a red square"] * 6}
    losses = []
    for memo in (None, 8):
        module = DiffusionTrainer(build_tiny_model(autoencoder_file), latent_memo=memo, p_uncond=0.0)
        module.train()
        row = []
        for _ in range(2):  # the second call is served from the memo
            torch.manual_seed(3)
            row.append(module.batch_loss(batch, training=True)[0].item())
        losses.append(row)
        if memo:
            assert module.latent_memo.hits == 9 and module.latent_memo.misses == 3
    # the same noise, t and posterior draw; the moments differ from batched encoding only by rounding
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[0][0] == losses[0][1] and losses[1][0] == losses[1][1]
