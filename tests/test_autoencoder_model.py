"""AutoencoderKL architecture: Stable Diffusion's key layout, shapes, input checks, attention/padding semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoencoder import AutoencoderKL, extract_first_stage_state_dict
from autoencoder.model import AttnBlock, Downsample, Upsample
from ldm.util import instantiate_from_config, load_config

KL_F8_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)

# The keys of `first_stage_model.*` in a Stable Diffusion v1/v2 checkpoint, prefix removed. Written out from the
# reference listing of SD's VAE keys (e.g. DiffSynth-Studio's `from_civitai` rename tables for the SD VAE
# encoder/decoder, which enumerate every `first_stage_model.` key), not generated from this code.
SD_VAE_KEYS = [
    "decoder.conv_in.bias",
    "decoder.conv_in.weight",
    "decoder.conv_out.bias",
    "decoder.conv_out.weight",
    "decoder.mid.attn_1.k.bias",
    "decoder.mid.attn_1.k.weight",
    "decoder.mid.attn_1.norm.bias",
    "decoder.mid.attn_1.norm.weight",
    "decoder.mid.attn_1.proj_out.bias",
    "decoder.mid.attn_1.proj_out.weight",
    "decoder.mid.attn_1.q.bias",
    "decoder.mid.attn_1.q.weight",
    "decoder.mid.attn_1.v.bias",
    "decoder.mid.attn_1.v.weight",
    "decoder.mid.block_1.conv1.bias",
    "decoder.mid.block_1.conv1.weight",
    "decoder.mid.block_1.conv2.bias",
    "decoder.mid.block_1.conv2.weight",
    "decoder.mid.block_1.norm1.bias",
    "decoder.mid.block_1.norm1.weight",
    "decoder.mid.block_1.norm2.bias",
    "decoder.mid.block_1.norm2.weight",
    "decoder.mid.block_2.conv1.bias",
    "decoder.mid.block_2.conv1.weight",
    "decoder.mid.block_2.conv2.bias",
    "decoder.mid.block_2.conv2.weight",
    "decoder.mid.block_2.norm1.bias",
    "decoder.mid.block_2.norm1.weight",
    "decoder.mid.block_2.norm2.bias",
    "decoder.mid.block_2.norm2.weight",
    "decoder.norm_out.bias",
    "decoder.norm_out.weight",
    "decoder.up.0.block.0.conv1.bias",
    "decoder.up.0.block.0.conv1.weight",
    "decoder.up.0.block.0.conv2.bias",
    "decoder.up.0.block.0.conv2.weight",
    "decoder.up.0.block.0.nin_shortcut.bias",
    "decoder.up.0.block.0.nin_shortcut.weight",
    "decoder.up.0.block.0.norm1.bias",
    "decoder.up.0.block.0.norm1.weight",
    "decoder.up.0.block.0.norm2.bias",
    "decoder.up.0.block.0.norm2.weight",
    "decoder.up.0.block.1.conv1.bias",
    "decoder.up.0.block.1.conv1.weight",
    "decoder.up.0.block.1.conv2.bias",
    "decoder.up.0.block.1.conv2.weight",
    "decoder.up.0.block.1.norm1.bias",
    "decoder.up.0.block.1.norm1.weight",
    "decoder.up.0.block.1.norm2.bias",
    "decoder.up.0.block.1.norm2.weight",
    "decoder.up.0.block.2.conv1.bias",
    "decoder.up.0.block.2.conv1.weight",
    "decoder.up.0.block.2.conv2.bias",
    "decoder.up.0.block.2.conv2.weight",
    "decoder.up.0.block.2.norm1.bias",
    "decoder.up.0.block.2.norm1.weight",
    "decoder.up.0.block.2.norm2.bias",
    "decoder.up.0.block.2.norm2.weight",
    "decoder.up.1.block.0.conv1.bias",
    "decoder.up.1.block.0.conv1.weight",
    "decoder.up.1.block.0.conv2.bias",
    "decoder.up.1.block.0.conv2.weight",
    "decoder.up.1.block.0.nin_shortcut.bias",
    "decoder.up.1.block.0.nin_shortcut.weight",
    "decoder.up.1.block.0.norm1.bias",
    "decoder.up.1.block.0.norm1.weight",
    "decoder.up.1.block.0.norm2.bias",
    "decoder.up.1.block.0.norm2.weight",
    "decoder.up.1.block.1.conv1.bias",
    "decoder.up.1.block.1.conv1.weight",
    "decoder.up.1.block.1.conv2.bias",
    "decoder.up.1.block.1.conv2.weight",
    "decoder.up.1.block.1.norm1.bias",
    "decoder.up.1.block.1.norm1.weight",
    "decoder.up.1.block.1.norm2.bias",
    "decoder.up.1.block.1.norm2.weight",
    "decoder.up.1.block.2.conv1.bias",
    "decoder.up.1.block.2.conv1.weight",
    "decoder.up.1.block.2.conv2.bias",
    "decoder.up.1.block.2.conv2.weight",
    "decoder.up.1.block.2.norm1.bias",
    "decoder.up.1.block.2.norm1.weight",
    "decoder.up.1.block.2.norm2.bias",
    "decoder.up.1.block.2.norm2.weight",
    "decoder.up.1.upsample.conv.bias",
    "decoder.up.1.upsample.conv.weight",
    "decoder.up.2.block.0.conv1.bias",
    "decoder.up.2.block.0.conv1.weight",
    "decoder.up.2.block.0.conv2.bias",
    "decoder.up.2.block.0.conv2.weight",
    "decoder.up.2.block.0.norm1.bias",
    "decoder.up.2.block.0.norm1.weight",
    "decoder.up.2.block.0.norm2.bias",
    "decoder.up.2.block.0.norm2.weight",
    "decoder.up.2.block.1.conv1.bias",
    "decoder.up.2.block.1.conv1.weight",
    "decoder.up.2.block.1.conv2.bias",
    "decoder.up.2.block.1.conv2.weight",
    "decoder.up.2.block.1.norm1.bias",
    "decoder.up.2.block.1.norm1.weight",
    "decoder.up.2.block.1.norm2.bias",
    "decoder.up.2.block.1.norm2.weight",
    "decoder.up.2.block.2.conv1.bias",
    "decoder.up.2.block.2.conv1.weight",
    "decoder.up.2.block.2.conv2.bias",
    "decoder.up.2.block.2.conv2.weight",
    "decoder.up.2.block.2.norm1.bias",
    "decoder.up.2.block.2.norm1.weight",
    "decoder.up.2.block.2.norm2.bias",
    "decoder.up.2.block.2.norm2.weight",
    "decoder.up.2.upsample.conv.bias",
    "decoder.up.2.upsample.conv.weight",
    "decoder.up.3.block.0.conv1.bias",
    "decoder.up.3.block.0.conv1.weight",
    "decoder.up.3.block.0.conv2.bias",
    "decoder.up.3.block.0.conv2.weight",
    "decoder.up.3.block.0.norm1.bias",
    "decoder.up.3.block.0.norm1.weight",
    "decoder.up.3.block.0.norm2.bias",
    "decoder.up.3.block.0.norm2.weight",
    "decoder.up.3.block.1.conv1.bias",
    "decoder.up.3.block.1.conv1.weight",
    "decoder.up.3.block.1.conv2.bias",
    "decoder.up.3.block.1.conv2.weight",
    "decoder.up.3.block.1.norm1.bias",
    "decoder.up.3.block.1.norm1.weight",
    "decoder.up.3.block.1.norm2.bias",
    "decoder.up.3.block.1.norm2.weight",
    "decoder.up.3.block.2.conv1.bias",
    "decoder.up.3.block.2.conv1.weight",
    "decoder.up.3.block.2.conv2.bias",
    "decoder.up.3.block.2.conv2.weight",
    "decoder.up.3.block.2.norm1.bias",
    "decoder.up.3.block.2.norm1.weight",
    "decoder.up.3.block.2.norm2.bias",
    "decoder.up.3.block.2.norm2.weight",
    "decoder.up.3.upsample.conv.bias",
    "decoder.up.3.upsample.conv.weight",
    "encoder.conv_in.bias",
    "encoder.conv_in.weight",
    "encoder.conv_out.bias",
    "encoder.conv_out.weight",
    "encoder.down.0.block.0.conv1.bias",
    "encoder.down.0.block.0.conv1.weight",
    "encoder.down.0.block.0.conv2.bias",
    "encoder.down.0.block.0.conv2.weight",
    "encoder.down.0.block.0.norm1.bias",
    "encoder.down.0.block.0.norm1.weight",
    "encoder.down.0.block.0.norm2.bias",
    "encoder.down.0.block.0.norm2.weight",
    "encoder.down.0.block.1.conv1.bias",
    "encoder.down.0.block.1.conv1.weight",
    "encoder.down.0.block.1.conv2.bias",
    "encoder.down.0.block.1.conv2.weight",
    "encoder.down.0.block.1.norm1.bias",
    "encoder.down.0.block.1.norm1.weight",
    "encoder.down.0.block.1.norm2.bias",
    "encoder.down.0.block.1.norm2.weight",
    "encoder.down.0.downsample.conv.bias",
    "encoder.down.0.downsample.conv.weight",
    "encoder.down.1.block.0.conv1.bias",
    "encoder.down.1.block.0.conv1.weight",
    "encoder.down.1.block.0.conv2.bias",
    "encoder.down.1.block.0.conv2.weight",
    "encoder.down.1.block.0.nin_shortcut.bias",
    "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.1.block.0.norm1.bias",
    "encoder.down.1.block.0.norm1.weight",
    "encoder.down.1.block.0.norm2.bias",
    "encoder.down.1.block.0.norm2.weight",
    "encoder.down.1.block.1.conv1.bias",
    "encoder.down.1.block.1.conv1.weight",
    "encoder.down.1.block.1.conv2.bias",
    "encoder.down.1.block.1.conv2.weight",
    "encoder.down.1.block.1.norm1.bias",
    "encoder.down.1.block.1.norm1.weight",
    "encoder.down.1.block.1.norm2.bias",
    "encoder.down.1.block.1.norm2.weight",
    "encoder.down.1.downsample.conv.bias",
    "encoder.down.1.downsample.conv.weight",
    "encoder.down.2.block.0.conv1.bias",
    "encoder.down.2.block.0.conv1.weight",
    "encoder.down.2.block.0.conv2.bias",
    "encoder.down.2.block.0.conv2.weight",
    "encoder.down.2.block.0.nin_shortcut.bias",
    "encoder.down.2.block.0.nin_shortcut.weight",
    "encoder.down.2.block.0.norm1.bias",
    "encoder.down.2.block.0.norm1.weight",
    "encoder.down.2.block.0.norm2.bias",
    "encoder.down.2.block.0.norm2.weight",
    "encoder.down.2.block.1.conv1.bias",
    "encoder.down.2.block.1.conv1.weight",
    "encoder.down.2.block.1.conv2.bias",
    "encoder.down.2.block.1.conv2.weight",
    "encoder.down.2.block.1.norm1.bias",
    "encoder.down.2.block.1.norm1.weight",
    "encoder.down.2.block.1.norm2.bias",
    "encoder.down.2.block.1.norm2.weight",
    "encoder.down.2.downsample.conv.bias",
    "encoder.down.2.downsample.conv.weight",
    "encoder.down.3.block.0.conv1.bias",
    "encoder.down.3.block.0.conv1.weight",
    "encoder.down.3.block.0.conv2.bias",
    "encoder.down.3.block.0.conv2.weight",
    "encoder.down.3.block.0.norm1.bias",
    "encoder.down.3.block.0.norm1.weight",
    "encoder.down.3.block.0.norm2.bias",
    "encoder.down.3.block.0.norm2.weight",
    "encoder.down.3.block.1.conv1.bias",
    "encoder.down.3.block.1.conv1.weight",
    "encoder.down.3.block.1.conv2.bias",
    "encoder.down.3.block.1.conv2.weight",
    "encoder.down.3.block.1.norm1.bias",
    "encoder.down.3.block.1.norm1.weight",
    "encoder.down.3.block.1.norm2.bias",
    "encoder.down.3.block.1.norm2.weight",
    "encoder.mid.attn_1.k.bias",
    "encoder.mid.attn_1.k.weight",
    "encoder.mid.attn_1.norm.bias",
    "encoder.mid.attn_1.norm.weight",
    "encoder.mid.attn_1.proj_out.bias",
    "encoder.mid.attn_1.proj_out.weight",
    "encoder.mid.attn_1.q.bias",
    "encoder.mid.attn_1.q.weight",
    "encoder.mid.attn_1.v.bias",
    "encoder.mid.attn_1.v.weight",
    "encoder.mid.block_1.conv1.bias",
    "encoder.mid.block_1.conv1.weight",
    "encoder.mid.block_1.conv2.bias",
    "encoder.mid.block_1.conv2.weight",
    "encoder.mid.block_1.norm1.bias",
    "encoder.mid.block_1.norm1.weight",
    "encoder.mid.block_1.norm2.bias",
    "encoder.mid.block_1.norm2.weight",
    "encoder.mid.block_2.conv1.bias",
    "encoder.mid.block_2.conv1.weight",
    "encoder.mid.block_2.conv2.bias",
    "encoder.mid.block_2.conv2.weight",
    "encoder.mid.block_2.norm1.bias",
    "encoder.mid.block_2.norm1.weight",
    "encoder.mid.block_2.norm2.bias",
    "encoder.mid.block_2.norm2.weight",
    "encoder.norm_out.bias",
    "encoder.norm_out.weight",
    "post_quant_conv.bias",
    "post_quant_conv.weight",
    "quant_conv.bias",
    "quant_conv.weight",
]

# (key, shape) pairs of the SD VAE (SD v1 checkpoint / diffusers conversion)
SD_VAE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
SD_VAE_NUM_PARAMETERS = 83_653_863  # diffusers' AutoencoderKL for SD v1.x reports the same count


@pytest.fixture(scope="module")
def kl_f8():
    torch.manual_seed(0)
    return AutoencoderKL(KL_F8_DDCONFIG, embed_dim=4).eval()


def test_kl_f8_state_dict_keys_equal_stable_diffusion(kl_f8):
    keys = set(kl_f8.state_dict())
    assert len(SD_VAE_KEYS) == 248 and len(set(SD_VAE_KEYS)) == 248
    assert sorted(keys - set(SD_VAE_KEYS)) == []
    assert sorted(set(SD_VAE_KEYS) - keys) == []
    state = kl_f8.state_dict()
    for key, shape in SD_VAE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(v.numel() for v in state.values()) == SD_VAE_NUM_PARAMETERS


def test_kl_f8_config_file_builds_the_sd_layout():
    config = load_config("configs/autoencoder/kl-f8.yaml")
    params = config.model.params
    model = AutoencoderKL(params.ddconfig, params.embed_dim)
    assert set(model.state_dict()) == set(SD_VAE_KEYS)


def test_kl_f8_encode_decode_shapes_on_small_input(kl_f8):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = kl_f8.encode(x)
        assert posterior.mean.shape == (1, 4, 4, 4)
        assert posterior.logvar.shape == (1, 4, 4, 4)
        assert kl_f8.decode(posterior.sample()).shape == (1, 3, 32, 32)
    assert kl_f8.downsampling_factor == 8


def test_shapes_config_encode_decode_shapes():
    config = load_config("configs/autoencoder/shapes-kl-f4.yaml")
    params = config.model.params
    model = AutoencoderKL(params.ddconfig, params.embed_dim)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        rec, posterior = model(x)
    assert posterior.mode().shape == (2, 4, 16, 16)  # 64x64 -> 16x16x4
    assert rec.shape == x.shape
    assert model.latent_shape(64, 64) == (4, 16, 16)


def test_sd_inference_config_params_instantiate_as_they_are():
    # first_stage_config of SD v1's v1-inference.yaml, verbatim (target renamed to this package)
    node = {
        "target": "autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": dict(TINY_DDCONFIG),
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }
    model = instantiate_from_config(node)
    assert isinstance(model, AutoencoderKL)
    assert model.monitor == "val/rec_loss"
    assert not any(k.startswith("loss") for k in model.state_dict())


@pytest.mark.parametrize("shape", [(1, 3, 17, 16), (1, 3, 16, 15), (1, 3, 1, 1)])
def test_encode_rejects_sizes_not_divisible_by_the_factor(shape):
    model = AutoencoderKL(TINY_DDCONFIG, embed_dim=4)
    with pytest.raises(ValueError, match=r"multiples of 2"):
        model.encode(torch.zeros(shape))


def test_encode_rejects_wrong_rank_and_channels():
    model = AutoencoderKL(TINY_DDCONFIG, embed_dim=4)
    with pytest.raises(ValueError, match="4-D"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="3 input channels"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"latents \[B, 4"):
        model.decode(torch.zeros(1, 3, 8, 8))


def test_factor_named_in_error_for_kl_f8(kl_f8):
    with pytest.raises(ValueError, match="multiples of 8"):
        kl_f8.encode(torch.zeros(1, 3, 36, 36))


def test_attention_matches_sd_formula_float64():
    torch.manual_seed(1)
    block = AttnBlock(32).double()
    for conv in (block.q, block.k, block.v, block.proj_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.1)
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64)
    # SD's AttnBlock: w[b,i,j] = softmax_j(sum_c q[b,c,i] k[b,c,j] / sqrt(C)); out[b,c,i] = sum_j v[b,c,j] w[b,i,j]
    h = block.norm(x)
    q, k, v = (conv(h).reshape(2, 32, 15) for conv in (block.q, block.k, block.v))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=2)
    out = torch.einsum("bcj,bij->bci", v, w).reshape(2, 32, 5, 3)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1).double()
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each 3x3 window
        down.conv.bias.zero_()
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4) + 1
    y = down(x)
    assert y.shape == (1, 1, 2, 2)
    # windows start at rows/cols 0 and 2 (no padding on top/left)
    torch.testing.assert_close(y[0, 0], x[0, 0, ::2, ::2])
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap reads the zero padding at the last window
    y = down(x)
    assert y[0, 0, 1, 1] == 0 and y[0, 0, 0, 0] == x[0, 0, 2, 2]


def test_upsample_is_nearest_then_conv():
    up = Upsample(1, with_conv=False)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    torch.testing.assert_close(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_sd_checkpoint_prefix_and_training_keys_are_handled(tmp_path):
    torch.manual_seed(0)
    source = AutoencoderKL(TINY_DDCONFIG, embed_dim=4).eval()
    full = {f"first_stage_model.{k}": v.clone() for k, v in source.state_dict().items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    full["first_stage_model.loss.logvar"] = torch.zeros(())
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": full}, path)

    vae_sd = extract_first_stage_state_dict(full)
    assert set(vae_sd) == set(source.state_dict())
    target = AutoencoderKL(TINY_DDCONFIG, embed_dim=4, ckpt_path=str(path)).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(target(x, sample_posterior=False)[0], source(x, sample_posterior=False)[0])


def test_mismatched_checkpoint_gives_a_clear_error(tmp_path):
    source = AutoencoderKL(TINY_DDCONFIG, embed_dim=4)
    state = source.state_dict()
    state.pop("decoder.conv_out.bias")
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        AutoencoderKL(TINY_DDCONFIG, embed_dim=4, ckpt_path=str(path))


def test_bad_ddconfig_is_rejected():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**TINY_DDCONFIG, "double_z": False}, embed_dim=4)
    with pytest.raises(ValueError, match="multiples of 32"):
        AutoencoderKL({**TINY_DDCONFIG, "ch": 48}, embed_dim=4)


def _reference_forward(sd, x, cfg, embed_dim):
    """SD's Encoder -> quant_conv -> (mode) -> post_quant_conv -> Decoder, written functionally from the reference
    model.py over a state dict (float64), independent of the modules under test."""

    def conv(name, h, stride=1, padding=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)

    def norm(name, h):
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def resnet(name, h):
        out = conv(f"{name}.conv1", F.silu(norm(f"{name}.norm1", h)))
        out = conv(f"{name}.conv2", F.silu(norm(f"{name}.norm2", out)))
        skip = conv(f"{name}.nin_shortcut", h, padding=0) if f"{name}.nin_shortcut.weight" in sd else h
        return skip + out

    def attn(name, h):
        b, c, hh, ww = h.shape
        n = norm(f"{name}.norm", h)
        q = conv(f"{name}.q", n, padding=0).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = conv(f"{name}.k", n, padding=0).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        v = conv(f"{name}.v", n, padding=0).reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return h + conv(f"{name}.proj_out", out, padding=0)

    levels, nrb = len(cfg["ch_mult"]), cfg["num_res_blocks"]
    h = conv("encoder.conv_in", x)
    for i in range(levels):
        for j in range(nrb):
            h = resnet(f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = attn(f"encoder.down.{i}.attn.{j}", h)
        if i != levels - 1:
            h = conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = resnet("encoder.mid.block_2", attn("encoder.mid.attn_1", resnet("encoder.mid.block_1", h)))
    h = conv("encoder.conv_out", F.silu(norm("encoder.norm_out", h)))
    moments = conv("quant_conv", h, padding=0)
    z = moments[:, :embed_dim]  # posterior mode
    h = conv("decoder.conv_in", conv("post_quant_conv", z, padding=0))
    h = resnet("decoder.mid.block_2", attn("decoder.mid.attn_1", resnet("decoder.mid.block_1", h)))
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            h = resnet(f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = attn(f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv("decoder.conv_out", F.silu(norm("decoder.norm_out", h)))


def test_forward_matches_a_functional_reference_of_sd():
    cfg = dict(TINY_DDCONFIG, ch_mult=[1, 2, 2], resolution=16, attn_resolutions=[16, 4], num_res_blocks=2)
    torch.manual_seed(3)
    model = AutoencoderKL(cfg, embed_dim=3).double().eval()
    assert "encoder.down.0.attn.1.q.weight" in model.state_dict()  # attention at 16x16 and 4x4 exercised
    assert "decoder.up.2.attn.2.proj_out.weight" in model.state_dict()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            p.add_(0.05 * torch.randn_like(p))
        x = torch.rand(2, 3, 16, 12, dtype=torch.float64) * 2 - 1
        expected = _reference_forward(model.state_dict(), x, cfg, embed_dim=3)
        actual, _ = model(x, sample_posterior=False)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
