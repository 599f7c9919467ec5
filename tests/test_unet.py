"""UNetModel: Stable Diffusion's configs, key layout and parameter counts; shapes, zero init, conditioning."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules import attention
from ldm.modules.attention import attention_backend, set_attention_backend
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion's unet_config nodes, verbatim from CompVis/stable-diffusion configs/stable-diffusion/
# v1-inference.yaml and Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml.
SD_V1_UNET_YAML = """
unet_config:
  target: ldm.modules.diffusionmodules.openaimodel.UNetModel
  params:
    image_size: 32 # unused
    in_channels: 4
    out_channels: 4
    model_channels: 320
    attention_resolutions: [ 4, 2, 1 ]
    num_res_blocks: 2
    channel_mult: [ 1, 2, 4, 4 ]
    num_heads: 8
    use_spatial_transformer: True
    transformer_depth: 1
    context_dim: 768
    use_checkpoint: True
    legacy: False
"""

SD_V2_UNET_YAML = """
unet_config:
  target: ldm.modules.diffusionmodules.openaimodel.UNetModel
  params:
    use_checkpoint: True
    use_fp16: True
    image_size: 32 # unused
    in_channels: 4
    out_channels: 4
    model_channels: 320
    attention_resolutions: [ 4, 2, 1 ]
    num_res_blocks: 2
    channel_mult: [ 1, 2, 4, 4 ]
    num_head_channels: 64 # need to fix for flash-attn
    use_spatial_transformer: True
    use_linear_in_transformer: True
    transformer_depth: 1
    context_dim: 1024
    legacy: False
"""

# ---------------------------------------------------------------------------------------------------------------
# SD's `model.diffusion_model` layout, written out block by block (independent of the model code).
# ("conv", cin, cout): 3x3 conv; ("res", cin, cout): ResBlock; ("st", c): SpatialTransformer on c channels;
# ("down", c): Downsample conv `op`; ("up", c): Upsample conv `conv`.
SD_LAYOUT = [
    ("input_blocks.0", [("conv", 4, 320)]),
    ("input_blocks.1", [("res", 320, 320), ("st", 320)]),
    ("input_blocks.2", [("res", 320, 320), ("st", 320)]),
    ("input_blocks.3", [("down", 320)]),
    ("input_blocks.4", [("res", 320, 640), ("st", 640)]),
    ("input_blocks.5", [("res", 640, 640), ("st", 640)]),
    ("input_blocks.6", [("down", 640)]),
    ("input_blocks.7", [("res", 640, 1280), ("st", 1280)]),
    ("input_blocks.8", [("res", 1280, 1280), ("st", 1280)]),
    ("input_blocks.9", [("down", 1280)]),
    ("input_blocks.10", [("res", 1280, 1280)]),
    ("input_blocks.11", [("res", 1280, 1280)]),
    ("middle_block", [("res", 1280, 1280), ("st", 1280), ("res", 1280, 1280)]),
    ("output_blocks.0", [("res", 2560, 1280)]),
    ("output_blocks.1", [("res", 2560, 1280)]),
    ("output_blocks.2", [("res", 2560, 1280), ("up", 1280)]),
    ("output_blocks.3", [("res", 2560, 1280), ("st", 1280)]),
    ("output_blocks.4", [("res", 2560, 1280), ("st", 1280)]),
    ("output_blocks.5", [("res", 1920, 1280), ("st", 1280), ("up", 1280)]),
    ("output_blocks.6", [("res", 1920, 640), ("st", 640)]),
    ("output_blocks.7", [("res", 1280, 640), ("st", 640)]),
    ("output_blocks.8", [("res", 960, 640), ("st", 640), ("up", 640)]),
    ("output_blocks.9", [("res", 960, 320), ("st", 320)]),
    ("output_blocks.10", [("res", 640, 320), ("st", 320)]),
    ("output_blocks.11", [("res", 640, 320), ("st", 320)]),
]
TIME_DIM = 1280


def expected_sd_shapes(context_dim: int, linear_proj: bool) -> dict:
    """Every key of SD's UNet state dict with its shape."""
    shapes = {
        "time_embed.0.weight": (TIME_DIM, 320), "time_embed.0.bias": (TIME_DIM,),
        "time_embed.2.weight": (TIME_DIM, TIME_DIM), "time_embed.2.bias": (TIME_DIM,),
        "out.0.weight": (320,), "out.0.bias": (320,),
        "out.2.weight": (4, 320, 3, 3), "out.2.bias": (4,),
    }
    for block, layers in SD_LAYOUT:
        for index, (kind, *ch) in enumerate(layers):
            p = f"{block}.{index}."
            if kind == "conv":
                shapes[p + "weight"], shapes[p + "bias"] = (ch[1], ch[0], 3, 3), (ch[1],)
            elif kind in ("down", "up"):
                name = "op" if kind == "down" else "conv"
                shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = (ch[0], ch[0], 3, 3), (ch[0],)
            elif kind == "res":
                cin, cout = ch
                shapes.update({
                    p + "in_layers.0.weight": (cin,), p + "in_layers.0.bias": (cin,),
                    p + "in_layers.2.weight": (cout, cin, 3, 3), p + "in_layers.2.bias": (cout,),
                    p + "emb_layers.1.weight": (cout, TIME_DIM), p + "emb_layers.1.bias": (cout,),
                    p + "out_layers.0.weight": (cout,), p + "out_layers.0.bias": (cout,),
                    p + "out_layers.3.weight": (cout, cout, 3, 3), p + "out_layers.3.bias": (cout,),
                })
                if cin != cout:
                    shapes[p + "skip_connection.weight"] = (cout, cin, 1, 1)
                    shapes[p + "skip_connection.bias"] = (cout,)
            else:  # spatial transformer, one block
                c = ch[0]
                proj = (c, c) if linear_proj else (c, c, 1, 1)
                t = p + "transformer_blocks.0."
                shapes.update({
                    p + "norm.weight": (c,), p + "norm.bias": (c,),
                    p + "proj_in.weight": proj, p + "proj_in.bias": (c,),
                    p + "proj_out.weight": proj, p + "proj_out.bias": (c,),
                    t + "attn1.to_q.weight": (c, c), t + "attn1.to_k.weight": (c, c), t + "attn1.to_v.weight": (c, c),
                    t + "attn1.to_out.0.weight": (c, c), t + "attn1.to_out.0.bias": (c,),
                    t + "attn2.to_q.weight": (c, c), t + "attn2.to_k.weight": (c, context_dim),
                    t + "attn2.to_v.weight": (c, context_dim),
                    t + "attn2.to_out.0.weight": (c, c), t + "attn2.to_out.0.bias": (c,),
                    t + "ff.net.0.proj.weight": (8 * c, c), t + "ff.net.0.proj.bias": (8 * c,),
                    t + "ff.net.2.weight": (c, 4 * c), t + "ff.net.2.bias": (c,),
                    t + "norm1.weight": (c,), t + "norm1.bias": (c,), t + "norm2.weight": (c,), t + "norm2.bias": (c,),
                    t + "norm3.weight": (c,), t + "norm3.bias": (c,),
                })
    return shapes


def unet_params(yaml_text):
    return OmegaConf.create(yaml_text)["unet_config"]


TINY = dict(
    image_size=16, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
    attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
    transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False,
)


def tiny(**overrides):
    return UNetModel(**{**TINY, **overrides})


def randomize_zero_inits(model, std=0.05):
    """Give every zero-initialised tensor random values so the output depends on all branches."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, std)
    return model


def inputs(batch=2, size=16, context_dim=32, seq=7, in_channels=4):
    return (
        torch.randn(batch, in_channels, size, size),
        torch.randint(0, 1000, (batch,)),
        torch.randn(batch, seq, context_dim),
    )


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"num_heads": -1, "num_head_channels": 16},
        {"use_linear_in_transformer": True, "num_res_blocks": 2},
        {"transformer_depth": 2, "attention_resolutions": [1, 2]},
        {"channel_mult": [1, 2, 2], "attention_resolutions": [2, 4]},
        {"use_scale_shift_norm": True, "resblock_updown": True},
    ],
    ids=["num_heads", "num_head_channels", "linear", "depth2", "three_levels", "scale_shift_updown"],
)
def test_output_shape_and_exact_zero_at_init(config):
    model = tiny(**config).eval()
    for batch in (1, 3):
        x, t, c = inputs(batch)
        with torch.no_grad():
            out = model(x, t, c)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.count_nonzero(out) == 0  # out.2 is zero-initialised
    randomize_zero_inits(model)
    for batch in (1, 3):
        x, t, c = inputs(batch)
        with torch.no_grad():
            out = model(x, t, c)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


def test_out_channels_differ_from_in_channels():
    model = tiny(in_channels=3, out_channels=8).eval()
    x, t, c = inputs(2, in_channels=3)
    assert model(x, t, c).shape == (2, 8, 16, 16)


def test_zero_initialised_layers():
    model = tiny(num_res_blocks=2, transformer_depth=2)
    # weight matrices / kernels that start at zero (norm biases start at zero anyway and are left out)
    zero = {n for n, p in model.named_parameters() if p.ndim >= 2 and torch.count_nonzero(p) == 0}
    expected = {"out.2.weight"}
    expected |= {n for n in model.state_dict() if n.endswith(("out_layers.3.weight", "proj_out.weight"))}
    assert zero == expected
    # ResBlocks: 2 + 2 down, 2 middle, 3 + 3 up; transformers at ds=2 only: 2 down, 1 middle, 3 up
    assert len(expected) == 1 + 12 + 6
    for name in expected:
        bias = model.state_dict()[name[: -len("weight")] + "bias"]
        assert torch.count_nonzero(bias) == 0


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backends_agree_in_unet(linear, dtype):
    model = randomize_zero_inits(tiny(use_linear_in_transformer=linear, attention_resolutions=[1, 2])).eval()
    x, t, c = inputs(2)
    model, x, c = model.to(dtype), x.to(dtype), c.to(dtype)
    with torch.no_grad():
        with attention_backend("sdpa"):
            a = model(x, t, c)
        with attention_backend("math"):
            b = model(x, t, c)
    assert a.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol * max(1.0, a.float().abs().max().item()), rtol=tol)


def test_cross_attention_uses_the_context():
    model = randomize_zero_inits(tiny()).eval()
    x, t, c = inputs(2)
    with torch.no_grad():
        a = model(x, t, c)
        b = model(x, t, torch.randn_like(c))
        again = model(x, t, c)
    torch.testing.assert_close(a, again, atol=0, rtol=0)
    assert (a - b).abs().max() > 1e-3
    # and the timestep
    with torch.no_grad():
        d = model(x, t + 1, c)
    assert (a - d).abs().max() > 1e-5


def test_scalar_timestep_broadcasts():
    model = randomize_zero_inits(tiny()).eval()
    x, _, c = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(5), c), model(x, torch.tensor([5, 5]), c))


@pytest.mark.parametrize("linear", [False, True])
def test_gradient_checkpointing_same_gradients(linear):
    torch.manual_seed(3)
    model = randomize_zero_inits(tiny(use_checkpoint=True, use_linear_in_transformer=linear)).double().train()
    x, t, c = inputs(2)
    x, c = x.double(), c.double()

    def grads(use_checkpoint):
        for m in model.modules():
            if hasattr(m, "use_checkpoint"):
                m.use_checkpoint = use_checkpoint
            if hasattr(m, "checkpoint") and isinstance(m.checkpoint, bool):
                m.checkpoint = use_checkpoint
        model.zero_grad()
        model(x, t, c).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    calls = []
    original = attention._torch_checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    plain = grads(False)
    attention._torch_checkpoint = counting
    try:
        checkpointed = grads(True)
        n_train = len(calls)
        with torch.no_grad():
            model(x, t, c)  # no grad: no checkpointing
        model.eval()
        model(x, t, c)  # eval mode: no checkpointing
        model.train()
    finally:
        attention._torch_checkpoint = original
    assert n_train > 0 and len(calls) == n_train
    assert all(k == {"use_reentrant": False} for k in calls)
    for g0, g1 in zip(plain, checkpointed):
        torch.testing.assert_close(g1, g0, atol=1e-12, rtol=1e-10)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999, 250.5], dtype=torch.float64)
    for dim in (8, 9, 320):
        emb = timestep_embedding(t, dim)
        assert emb.shape == (5, dim) and emb.dtype == torch.float32
        half = dim // 2
        for b, tb in enumerate(t.tolist()):
            for i in range(half):
                freq = math.exp(-math.log(10000) * i / half)
                assert emb[b, i].item() == pytest.approx(math.cos(tb * freq), abs=2e-4)
                assert emb[b, half + i].item() == pytest.approx(math.sin(tb * freq), abs=2e-4)
            if dim % 2:
                assert emb[b, -1].item() == 0.0
    # t = 0: cos part all ones, sin part all zeros (cos first)
    emb = timestep_embedding(torch.zeros(1), 6, max_period=100)
    assert emb.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_channels_last_same_output_and_format():
    model = randomize_zero_inits(tiny(use_linear_in_transformer=True)).eval()
    x, t, c = inputs(2)
    with torch.no_grad():
        expected = model(x, t, c)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, c)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_input_checks():
    model = tiny(channel_mult=[1, 2, 2], attention_resolutions=[2]).eval()
    x, t, c = inputs(1, size=16)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 4, 18, 16), t, c)
    with pytest.raises(ValueError, match="context_dim=32"):
        model(x, t, torch.randn(1, 7, 33))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 3, 16, 16), t, c)
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.zeros(3), c)
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**{**TINY, "context_dim": None})
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**{**TINY, "num_heads": -1})
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetModel(**{**TINY, "num_res_blocks": [1, 1, 1]})
    with pytest.raises(ValueError, match="cannot be split"):
        UNetModel(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="cannot be split"):
        UNetModel(**{**TINY, "num_heads": -1, "num_head_channels": 24})
    with pytest.raises(TypeError):
        model(x, t, c, cond=c)  # no silently ignored keyword arguments


def test_class_conditional_attention_block_unet():
    model = UNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions=[2], channel_mult=[1, 2], num_classes=10, num_head_channels=16,
        use_new_attention_order=True, use_scale_shift_norm=True,
    )
    randomize_zero_inits(model).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([1, 2]))
        b = model(x, t, y=torch.tensor([1, 5]))
    assert a.shape == x.shape
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4
    assert "input_blocks.3.1.qkv.weight" in model.state_dict()  # AttentionBlock keys (ds=2 after one Downsample)
    set_attention_backend("math", model)  # per-module override reaches AttentionBlock too
    assert model.input_blocks[3][1].backend == "math"
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y=torch.tensor([1, 2])), a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


def test_attention_block_qkv_orders_agree_for_permuted_weights():
    """Legacy order reads qkv rows as [head][q|k|v][ch], the new order as [q|k|v][head][ch]."""
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock

    channels, heads = 64, 4
    ch = channels // heads
    new = AttentionBlock(channels, num_heads=heads, use_new_attention_order=True).double()
    legacy = AttentionBlock(channels, num_heads=heads, use_new_attention_order=False).double()
    randomize_zero_inits(new)
    legacy.load_state_dict(new.state_dict())
    order = [p * channels + h * ch + i for h in range(heads) for p in range(3) for i in range(ch)]
    with torch.no_grad():
        legacy.qkv.weight.copy_(new.qkv.weight[order])
        legacy.qkv.bias.copy_(new.qkv.bias[order])
    x = torch.randn(2, channels, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(legacy(x), new(x), atol=1e-12, rtol=1e-12)
    # and the new order against attention written out per head
    h = torch.nn.functional.group_norm(x.reshape(2, channels, 16), 32, new.norm.weight, new.norm.bias, 1e-5)
    qkv = torch.einsum("oc,bct->bot", new.qkv.weight[..., 0], h) + new.qkv.bias[:, None]
    q, k, v = qkv.reshape(2, 3, heads, ch, 16).unbind(1)
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / ch**0.5, dim=-1)
    a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(2, channels, 16)
    out = x.reshape(2, channels, 16) + torch.einsum("oc,bct->bot", new.proj_out.weight[..., 0], a) + new.proj_out.bias[:, None]
    torch.testing.assert_close(new(x), out.reshape(x.shape), atol=1e-12, rtol=1e-12)


def test_fp16_flag_accepted_but_cpu_runs_float32():
    torch.manual_seed(0)
    a = tiny(use_fp16=True).eval()
    b = tiny().eval()
    b.load_state_dict(a.state_dict())
    randomize_zero_inits(a)
    b.load_state_dict(a.state_dict())
    x, t, c = inputs(1)
    with torch.no_grad():
        out = a(x, t, c)
    assert out.dtype == torch.float32 and next(a.parameters()).dtype == torch.float32
    torch.testing.assert_close(out, b(x, t, c), atol=0, rtol=0)


def test_half_precision_module_casts_input_in_and_output_back():
    model = randomize_zero_inits(tiny()).eval()
    x, t, c = inputs(1)
    with torch.no_grad():
        expected = model(x, t, c)
        out = model.to(torch.bfloat16)(x, t, c)  # fp32 latents into a bf16 model
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=5e-2 * expected.abs().max().item(), rtol=5e-2)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "yaml_text, context_dim, linear, n_params",
    [(SD_V1_UNET_YAML, 768, False, 859_520_964), (SD_V2_UNET_YAML, 1024, True, 865_910_724)],
    ids=["v1", "v2"],
)
def test_sd_configs_state_dict_layout_and_parameter_count(yaml_text, context_dim, linear, n_params):
    expected = expected_sd_shapes(context_dim, linear)
    assert len(expected) == 686
    assert sum(math.prod(s) for s in expected.values()) == n_params  # the literal layout itself is right
    with torch.device("meta"):
        model = instantiate_from_config(unet_params(yaml_text), path="model.params.unet_config")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) - set(expected) == set() and set(expected) - set(shapes) == set()
    assert shapes == expected
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("yaml_text", [SD_V1_UNET_YAML, SD_V2_UNET_YAML], ids=["v1", "v2"])
def test_sd_configs_instantiate_tiny_and_run(yaml_text):
    node = unet_params(yaml_text)
    original_keys = set(node.params)
    node.params.model_channels = 32
    node.params.context_dim = 32
    node.params.channel_mult = [1, 2]
    node.params.attention_resolutions = [2, 1]
    node.params.num_res_blocks = 1
    if "num_heads" in node.params:
        node.params.num_heads = 2
    else:
        node.params.num_head_channels = 16
    assert set(node.params) == original_keys  # every key of SD's config is still passed
    model = instantiate_from_config(node, path="model.params.unet_config")
    assert model.use_checkpoint
    model = randomize_zero_inits(model).train()
    x, t, c = inputs(2)
    out = model(x, t, c)
    out.square().mean().backward()
    assert out.shape == x.shape and out.dtype == torch.float32
    assert model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.grad is not None


def test_sd_key_layout_loads_and_computes_same_function():
    """A state dict in SD's layout (keys by name) into a fresh model gives the same outputs."""
    a = randomize_zero_inits(tiny(use_linear_in_transformer=True, num_res_blocks=2)).eval()
    b = tiny(use_linear_in_transformer=True, num_res_blocks=2).eval()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b.load_state_dict(state, strict=True)
    x, t, c = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, c), b(x, t, c), atol=0, rtol=0)
