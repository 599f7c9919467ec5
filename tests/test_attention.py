"""Attention layers: backends agree with each other and with a float64 reference; SD's key layout."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from ldm.modules import attention
from ldm.modules.attention import (
    BasicTransformerBlock,
    CrossAttention,
    SpatialTransformer,
    attention_backend,
    get_attention_backend,
    scaled_dot_product_attention,
    set_attention_backend,
)


def reference_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v in float64, softmax written out; q [B,H,N,D], k/v [B,H,M,D]."""
    q, k, v = q.double(), k.double(), v.double()
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v


def reference_cross_attention(layer, x, context=None):
    """CrossAttention written from its definition: heads split along the feature axis."""
    context = x if context is None else context
    w = {name: p.double() for name, p in layer.named_parameters()}
    b, n, _ = x.shape
    h, d = layer.heads, layer.dim_head
    q = (x.double() @ w["to_q.weight"].T).reshape(b, n, h, d).permute(0, 2, 1, 3)
    k = (context.double() @ w["to_k.weight"].T).reshape(b, -1, h, d).permute(0, 2, 1, 3)
    v = (context.double() @ w["to_v.weight"].T).reshape(b, -1, h, d).permute(0, 2, 1, 3)
    out = reference_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n, h * d)
    return out @ w["to_out.0.weight"].T + w["to_out.0.bias"]


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = get_attention_backend()
    yield
    set_attention_backend(previous)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("with_context", [False, True])
def test_cross_attention_matches_float64_reference(backend, with_context):
    layer = CrossAttention(32, context_dim=24 if with_context else None, heads=4, dim_head=8, backend=backend)
    x = torch.randn(3, 10, 32)
    context = torch.randn(3, 7, 24) if with_context else None
    out = layer(x, context)
    assert out.shape == (3, 10, 32)
    torch.testing.assert_close(out.double(), reference_cross_attention(layer, x, context), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_context", [False, True])
def test_sdpa_and_math_agree_float32(with_context):
    layer = CrossAttention(32, context_dim=16 if with_context else None, heads=2, dim_head=16)
    x = torch.randn(2, 20, 32)
    context = torch.randn(2, 5, 16) if with_context else None
    with attention_backend("sdpa"):
        a = layer(x, context)
    with attention_backend("math"):
        b = layer(x, context)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("with_context", [False, True])
def test_sdpa_and_math_agree_bfloat16(with_context):
    layer = CrossAttention(32, context_dim=16 if with_context else None, heads=2, dim_head=16).to(torch.bfloat16)
    x = torch.randn(2, 20, 32, dtype=torch.bfloat16)
    context = torch.randn(2, 5, 16, dtype=torch.bfloat16) if with_context else None
    with attention_backend("sdpa"):
        a = layer(x, context)
    with attention_backend("math"):
        b = layer(x, context)
    assert a.dtype == b.dtype == torch.bfloat16
    reference = reference_cross_attention(layer, x, context)
    for out in (a, b):
        torch.testing.assert_close(out.double(), reference, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_math_backend_softmax_in_float32_under_bfloat16():
    # Logits 256 + t/2 (t = 0..3): bf16 spacing at 256 is 2, so a bf16 softmax would lose these differences.
    q = torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16)
    q[..., 0], q[..., 1] = 32.0, 1.0
    k = torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16)
    k[..., 0] = 16.0
    k[0, 0, :, 1] = torch.arange(4, dtype=torch.bfloat16)
    v = torch.eye(4, dtype=torch.bfloat16)[None, None]
    out = scaled_dot_product_attention(q, k, v, backend="math")
    expected = torch.softmax(torch.arange(4, dtype=torch.float64) / 2, dim=0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0, 0, 0].double(), expected, atol=1e-2, rtol=0)
    # and under autocast (where matmuls would otherwise be recast to bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k, v, backend="math")
    torch.testing.assert_close(out[0, 0, 0].double(), expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_key_mask_ignores_masked_keys(backend):
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    out = scaled_dot_product_attention(q, k, v, mask=mask, backend=backend)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    only_kept = reference_attention(q[:1], k[:1, :, :3], v[:1, :, :3])
    torch.testing.assert_close(out[:1].double(), only_kept, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="boolean"):
        scaled_dot_product_attention(q, k, v, mask=mask.float(), backend=backend)


def test_xformers_on_cpu_falls_back_to_sdpa_with_one_log(caplog):
    attention._logged.clear()
    layer = CrossAttention(16, heads=2, dim_head=8)
    x = torch.randn(2, 9, 16)
    with attention_backend("sdpa"):
        expected = layer(x)
    with caplog.at_level(logging.WARNING, logger="ldm.modules.attention"):
        with attention_backend("xformers"):
            first = layer(x)
            second = layer(x)
    assert attention.resolve_backend("xformers", x) == "sdpa"
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    torch.testing.assert_close(second, expected, atol=0, rtol=0)
    messages = [r.getMessage() for r in caplog.records if "falling back to sdpa" in r.getMessage()]
    assert len(messages) == 1, messages


def test_backend_setting_global_and_per_module():
    block = BasicTransformerBlock(16, 2, 8, context_dim=8, checkpoint=False)
    set_attention_backend("math")
    assert get_attention_backend() == "math"
    assert attention.resolve_backend(None, torch.zeros(1)) == "math"
    set_attention_backend("sdpa", block)
    assert block.attn1.backend == block.attn2.backend == "sdpa"
    assert get_attention_backend() == "math"  # the per-module override leaves the global setting alone
    assert attention.resolve_backend(block.attn1.backend, torch.zeros(1)) == "sdpa"
    set_attention_backend(None, block)
    assert block.attn1.backend is None
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("flash9000")
    with pytest.raises(ValueError, match="unknown attention backend"):
        CrossAttention(8, backend="nope")


def test_env_var_selects_backend_and_rejects_typos():
    # A fresh interpreter: the variable is read when the module is imported.
    code = (
        "import importlib, os\n"
        "import ldm.modules.attention as a\n"
        "print(a.get_attention_backend())\n"
        "os.environ['LDM_ATTENTION_BACKEND'] = 'flsh'\n"
        "try:\n"
        "    importlib.reload(a)\n"
        "except ValueError as error:\n"
        "    print('error:', error)\n"
    )
    env = dict(os.environ, LDM_ATTENTION_BACKEND="math")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "math"
    assert lines[1].startswith("error:") and "LDM_ATTENTION_BACKEND" in lines[1] and "flsh" in lines[1]


def test_cross_attention_rejects_wrong_context_width():
    layer = CrossAttention(16, context_dim=8, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="expects 8"):
        layer(torch.randn(1, 4, 16), torch.randn(1, 3, 9))


def test_key_names_follow_stable_diffusion():
    block = BasicTransformerBlock(32, 2, 16, context_dim=24)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    expected = {
        "attn1.to_q.weight": (32, 32), "attn1.to_k.weight": (32, 32), "attn1.to_v.weight": (32, 32),
        "attn1.to_out.0.weight": (32, 32), "attn1.to_out.0.bias": (32,),
        "attn2.to_q.weight": (32, 32), "attn2.to_k.weight": (32, 24), "attn2.to_v.weight": (32, 24),
        "attn2.to_out.0.weight": (32, 32), "attn2.to_out.0.bias": (32,),
        "ff.net.0.proj.weight": (256, 32), "ff.net.0.proj.bias": (256,),
        "ff.net.2.weight": (32, 128), "ff.net.2.bias": (32,),
        "norm1.weight": (32,), "norm1.bias": (32,), "norm2.weight": (32,), "norm2.bias": (32,),
        "norm3.weight": (32,), "norm3.bias": (32,),
    }
    assert shapes == expected
    assert isinstance(block.attn1.to_out[1], torch.nn.Dropout)
    conv = SpatialTransformer(64, 2, 16, context_dim=24)
    linear = SpatialTransformer(64, 2, 16, context_dim=24, use_linear=True)
    assert tuple(conv.state_dict()["proj_in.weight"].shape) == (32, 64, 1, 1)
    assert tuple(conv.state_dict()["proj_out.weight"].shape) == (64, 32, 1, 1)
    assert tuple(linear.state_dict()["proj_in.weight"].shape) == (32, 64)
    assert tuple(linear.state_dict()["proj_out.weight"].shape) == (64, 32)
    assert conv.norm.num_groups == 32 and conv.norm.eps == 1e-6
    assert "transformer_blocks.0.attn2.to_k.weight" in conv.state_dict()


def test_block_is_pre_norm_residual():
    block = BasicTransformerBlock(16, 2, 8, context_dim=12, checkpoint=False).double()
    x, ctx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    ln = torch.nn.functional.layer_norm
    h = x + reference_cross_attention(block.attn1, ln(x, (16,), block.norm1.weight, block.norm1.bias))
    h = h + reference_cross_attention(block.attn2, ln(h, (16,), block.norm2.weight, block.norm2.bias), ctx)
    z = ln(h, (16,), block.norm3.weight, block.norm3.bias)
    a, gate = (z @ block.ff.net[0].proj.weight.T + block.ff.net[0].proj.bias).chunk(2, dim=-1)
    gelu = 0.5 * gate * (1 + torch.erf(gate / 2**0.5))
    h = h + (a * gelu) @ block.ff.net[2].weight.T + block.ff.net[2].bias
    torch.testing.assert_close(block(x, ctx), h, atol=1e-10, rtol=1e-10)


def test_disable_self_attn_makes_attn1_attend_to_context():
    block = BasicTransformerBlock(16, 2, 8, context_dim=12, disable_self_attn=True, checkpoint=False)
    assert tuple(block.attn1.to_k.weight.shape) == (16, 12)
    out = block(torch.randn(1, 4, 16), torch.randn(1, 3, 12))
    assert out.shape == (1, 4, 16)


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_identity_at_init_and_uses_context(use_linear):
    st = SpatialTransformer(32, 2, 16, depth=2, context_dim=8, use_linear=use_linear).eval()
    x = torch.randn(2, 32, 4, 6)
    ctx = torch.randn(2, 3, 8)
    torch.testing.assert_close(st(x, ctx), x, atol=0, rtol=0)  # zero proj_out: exactly the residual
    torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    a, b = st(x, ctx), st(x, torch.randn(2, 3, 8))
    assert (a - b).abs().max() > 1e-4
    # a list of contexts, one per block, is accepted
    torch.testing.assert_close(st(x, [ctx, ctx]), a)
    with pytest.raises(ValueError, match="depth 2"):
        st(x, [ctx, ctx, ctx])


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_channels_last(use_linear):
    st = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=use_linear).eval()
    torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    x = torch.randn(2, 32, 4, 6)
    ctx = torch.randn(2, 3, 8)
    expected = st(x, ctx)
    assert expected.is_contiguous()
    st_cl = st.to(memory_format=torch.channels_last)
    out = st_cl(x.contiguous(memory_format=torch.channels_last), ctx)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_transformer_proj_out_sees_the_input_layout(channels_last):
    """proj_out (the 1x1 conv) gets the input's memory format, not a channels_last view of a contiguous input:
    mixed layouts there made the bf16 SD-v1 training step 13% slower."""
    st = SpatialTransformer(32, 2, 16, context_dim=8).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    st = st.to(memory_format=fmt)
    seen = []
    st.proj_out.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(memory_format=fmt)))
    st(torch.randn(2, 32, 4, 6).contiguous(memory_format=fmt), torch.randn(2, 3, 8))
    assert seen == [True]


def test_transformer_block_checkpoint_same_gradients():
    torch.manual_seed(1)
    block = BasicTransformerBlock(16, 2, 8, context_dim=12, checkpoint=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 3, 12, dtype=torch.float64)
    block(x, ctx).square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    block.checkpoint = True
    calls = []
    original = attention._torch_checkpoint
    try:
        attention._torch_checkpoint = lambda *a, **k: calls.append(k) or original(*a, **k)
        block(x, ctx).square().sum().backward()
    finally:
        attention._torch_checkpoint = original
    assert calls == [{"use_reentrant": False}]
    for g, p in zip(grads, list(block.parameters()) + [x]):
        torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-12)
