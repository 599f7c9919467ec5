"""The benchmarked work: each case builds our model and/or the diffusers model on the same weights.

A builder returns a :class:`Work`: zero-argument callables ``ours()`` / ``theirs()`` that do one unit of work
and return a tensor to compare (an output, or a gradient for training steps). ``impl`` selects what is built:
``"both"`` (timing and comparison, diffusers gets our weights converted), ``"ours"`` or ``"diffusers"`` (a
memory-measuring subprocess: only that side is built, with random weights, since values do not change memory).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIFFUSION_CONFIG = os.path.join(REPO, "configs", "demo", "diffusion.yaml")
DEMO_AUTOENCODER_CONFIG = os.path.join(REPO, "configs", "demo", "autoencoder.yaml")
KL_F8_CONFIG = os.path.join(REPO, "configs", "autoencoder", "kl-f8.yaml")

IMPLS = ("both", "ours", "diffusers")

# Stable Diffusion v1's UNet (v1-inference.yaml), latents at 32x32 here.
SD_V1_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=768, use_checkpoint=False, legacy=False,
)

GUIDANCE_SCALE = 5.0
DDIM_STEPS = 50
PROMPTS = ["a red circle", "a green square", "a blue triangle", "a yellow triangle"]


@dataclass
class Work:
    case: str
    setting: str
    ours: Optional[Callable[[], torch.Tensor]] = None
    theirs: Optional[Callable[[], torch.Tensor]] = None
    compared: str = "output"
    per: str = ""  # unit of the per-item time ("image"), empty: per call
    items: int = 1  # items per call (times are divided by it when ``per`` is set)
    flops_fn: Optional[Callable[[], Any]] = None  # one call of ours, for FlopCounterMode
    make_variants: Optional[Callable[..., dict]] = None  # our alternative settings: {name: callable}
    # diffusers' speed settings under the same names as ours, so each of ours is timed against its like
    make_their_variants: Optional[Callable[..., dict]] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _load(path: str) -> dict:
    from ldm.util import load_config, to_container

    return to_container(load_config(path))


def _perturbed(module: torch.nn.Module, perturb: bool, seed: int = 1) -> torch.nn.Module:
    if perturb:
        from benchmarks.diffusers_compat import perturb_parameters

        perturb_parameters(module, torch.Generator().manual_seed(seed))
    return module


# ---------------------------------------------------------------------------------------------------- UNet


@dataclass(frozen=True)
class UNetSpec:
    params: dict
    latent: tuple  # (C, h, w)
    context: tuple  # (L, D)
    train_batch: int


# What the demo UNet has beyond SD's layout: the pooled-prompt path (the model's ``pooled_context``), which diffusers'
# text-to-image UNet has no place for. Ours against diffusers runs the demo UNet without it.
POOLED_PROMPT_UNET_KEYS = ("num_classes", "adm_in_channels", "use_scale_shift_norm")


def _demo_unet_params() -> dict:
    params = _load(DEMO_DIFFUSION_CONFIG)["model"]["unet"]["params"]
    return {key: value for key, value in params.items() if key not in POOLED_PROMPT_UNET_KEYS}


def unet_specs() -> dict[str, UNetSpec]:
    demo = _demo_unet_params()
    return {
        "demo": UNetSpec(demo, (demo["in_channels"], 16, 16), (77, demo["context_dim"]), train_batch=32),
        "sd-v1": UNetSpec(SD_V1_UNET, (4, 32, 32), (77, 768), train_batch=2),
    }


def _our_unet(params: dict, perturb: bool):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    return _perturbed(UNetModel(**params), perturb).eval()


def _their_unet(spec: UNetSpec, ours):
    from benchmarks.diffusers_compat import to_diffusers_unet

    state = None if ours is None else ours.state_dict()
    return to_diffusers_unet(spec.params, state, sample_size=spec.latent[-1])


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` behind ``torch.compile`` (TorchInductor, C++ kernels on the CPU), sharing its weights: no copy, so
    an SD-sized UNet is held once however many settings time it."""
    return torch.compile(module, dynamic=False)


def _speed_settings(call: Callable[..., torch.Tensor], module: torch.nn.Module, compile: bool,
                    call_bf16_weights: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None) -> dict:
    """The settings both implementations get: ``call(module, bf16)`` in bf16 autocast, compiled, and both; with
    ``call_bf16_weights`` (inference: bf16 inputs), also on a bf16 copy of the weights, as diffusers' pipelines run
    with ``torch_dtype=torch.bfloat16`` (autocast casts every weight on every call)."""
    found = {"bf16 autocast": lambda: call(module, True)}
    if call_bf16_weights is not None:
        bf16_copy = copy.deepcopy(module).to(torch.bfloat16)
        found["bf16 weights"] = lambda: call_bf16_weights(bf16_copy)
    if compile:
        compiled = _compiled(module)
        found["torch.compile"] = lambda: call(compiled, False)
        found["torch.compile + bf16 autocast"] = lambda: call(compiled, True)
    return found


def _unet_infer(unet, x, t, context, bf16: bool = False) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return unet(x, t, context=context).float()


def _their_unet_infer(unet, x, t, context, bf16: bool = False) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return unet(x, t, encoder_hidden_states=context).sample.float()


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def unet_step(name: str, impl: str = "both", perturb: bool = True) -> Work:
    """One UNet evaluation of a guided sampling step: batch 2 (uncond + cond), fp32, no grad."""
    _check_impl(impl)
    spec = unet_specs()[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *spec.latent, generator=g)
    t = torch.full((2,), 500, dtype=torch.int64)
    context = torch.randn(2, *spec.context, generator=g)
    x_bf16, context_bf16 = x.bfloat16(), context.bfloat16()
    work = Work(f"unet_step/{name}", f"batch 2, latents {_shape(spec.latent)}, context 2x{_shape(spec.context)}")
    ours = None
    if impl in ("both", "ours"):
        ours = _our_unet(spec.params, perturb)
        work.ours = lambda: _unet_infer(ours, x, t, context)
        work.flops_fn = work.ours

        def variants(compile: bool = True) -> dict:
            # A copy, so the default-layout model stays as it is for the round-robin against it.
            channels_last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            return {**_speed_settings(lambda m, bf16: _unet_infer(m, x, t, context, bf16), ours, compile,
                                      lambda m: _unet_infer(m, x_bf16, t, context_bf16)),
                    "channels_last": lambda: _unet_infer(channels_last, x_cl, t, context)}

        work.make_variants = variants
    if impl in ("both", "diffusers"):
        theirs = _their_unet(spec, ours)
        work.theirs = lambda: _their_unet_infer(theirs, x, t, context)
        work.make_their_variants = lambda compile=True: _speed_settings(
            lambda m, bf16: _their_unet_infer(m, x, t, context, bf16), theirs, compile,
            lambda m: _their_unet_infer(m, x_bf16, t, context_bf16))
    return work


def unet_train(name: str, impl: str = "both", perturb: bool = True) -> Work:
    """Forward + backward of an MSE loss (a training step without the optimizer), fp32, grads set to None first."""
    _check_impl(impl)
    spec = unet_specs()[name]
    batch = spec.train_batch
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, *spec.latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, *spec.context, generator=g)
    target = torch.randn(batch, *spec.latent, generator=g)
    work = Work(f"unet_train/{name}", f"fwd+bwd, batch {batch}, latents {_shape(spec.latent)}",
                compared="grad of input conv")
    ours = None
    if impl in ("both", "ours"):
        ours = _our_unet(spec.params, perturb).train()
        our_params = list(ours.parameters())

        def our_step(model=ours, bf16: bool = False) -> torch.Tensor:
            # bf16 as Lightning's bf16-mixed: the forward in autocast, the loss and backward outside it
            for p in our_params:
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x, t, context=context)
            F.mse_loss(out.float(), target).backward()
            return ours.input_blocks[0][0].weight.grad

        work.ours = work.flops_fn = our_step
        work.make_variants = lambda compile=True: _speed_settings(our_step, ours, compile)
    if impl in ("both", "diffusers"):
        theirs = _their_unet(spec, ours).train()
        their_params = list(theirs.parameters())

        def their_step(model=theirs, bf16: bool = False) -> torch.Tensor:
            for p in their_params:
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x, t, encoder_hidden_states=context).sample
            F.mse_loss(out.float(), target).backward()
            return theirs.conv_in.weight.grad

        work.theirs = their_step
        work.make_their_variants = lambda compile=True: _speed_settings(their_step, theirs, compile)
    return work


# ---------------------------------------------------------------------------------------------------- VAE


def vae_specs() -> dict[str, tuple[dict, int, int]]:
    """name -> (ddconfig, embed_dim, latent size)."""
    demo = _load(DEMO_AUTOENCODER_CONFIG)["model"]["params"]
    kl_f8 = _load(KL_F8_CONFIG)["model"]["params"]
    return {"demo": (demo["ddconfig"], demo["embed_dim"], 16), "kl-f8": (kl_f8["ddconfig"], kl_f8["embed_dim"], 32)}


def vae_decode(name: str, impl: str = "both", perturb: bool = True) -> Work:
    """Decode one latent (batch 1), fp32, no grad."""
    from autoencoder import AutoencoderKL
    from benchmarks.diffusers_compat import to_diffusers_vae

    _check_impl(impl)
    ddconfig, embed_dim, size = vae_specs()[name]
    z = torch.randn(1, embed_dim, size, size, generator=torch.Generator().manual_seed(4))
    f = 2 ** (len(ddconfig["ch_mult"]) - 1)
    work = Work(f"vae_decode/{name}", f"batch 1, latents {embed_dim}x{size}x{size} -> {size * f}x{size * f} px")
    ours = None
    if impl in ("both", "ours"):
        torch.manual_seed(0)
        ours = _perturbed(AutoencoderKL(ddconfig, embed_dim), perturb).eval()

        def decode_with(model, bf16: bool = False, latent: torch.Tensor = z) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model(latent).float()

        decoder = _Decode(ours)
        work.ours = lambda: decode_with(decoder)

        def variants(compile: bool = True) -> dict:
            channels_last = _Decode(copy.deepcopy(ours).to(memory_format=torch.channels_last))
            return {**_speed_settings(decode_with, decoder, compile, lambda m: decode_with(m, latent=z.bfloat16())),
                    "channels_last": lambda: decode_with(channels_last)}

        work.make_variants = variants
    if impl in ("both", "diffusers"):
        theirs = _Decode(to_diffusers_vae(ddconfig, embed_dim, None if ours is None else ours.state_dict()))

        def their_decode(model=theirs, bf16: bool = False, latent: torch.Tensor = z) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model(latent).float()

        work.theirs = their_decode
        work.make_their_variants = lambda compile=True: _speed_settings(
            their_decode, theirs, compile, lambda m: their_decode(m, latent=z.bfloat16()))
    return work


class _Decode(torch.nn.Module):
    """``vae.decode(z)`` as a module's forward (diffusers' ``DecoderOutput`` unwrapped), so ``torch.compile`` takes the
    whole decode of either implementation."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(z)
        return getattr(out, "sample", out)


# ---------------------------------------------------------------------------------------------------- txt2img


def demo_model_config(scale_factor: float = 1.0) -> dict:
    """The LatentDiffusion config the demo checkpoint carries, built from the demo YAML files (without the pooled
    prompt, as the shipped weights were trained)."""
    diffusion = {key: value for key, value in _load(DEMO_DIFFUSION_CONFIG)["model"].items() if key != "pooled_context"}
    diffusion["unet"] = {**diffusion["unet"], "params": _demo_unet_params()}
    ae = _load(DEMO_AUTOENCODER_CONFIG)["model"]["params"]
    return {
        **diffusion,
        "autoencoder": {"target": "autoencoder.AutoencoderKL",
                        "params": {"ddconfig": ae["ddconfig"], "embed_dim": ae["embed_dim"]}},
        "scale_factor": scale_factor,
    }


def txt2img(impl: str = "both", n_images: int = 4, perturb: bool = True, checkpoint: Optional[str] = None) -> Work:
    """``ldm.generate.generate``: 50 DDIM steps, guidance 5, ``n_images`` prompts in one batch, decoded to pixels.

    diffusers side: its ``DDIMScheduler`` (SD settings) with the converted UNet and VAE, our text embeddings,
    the same initial noise and guidance. Without the shipped checkpoint, the demo config with random (perturbed)
    weights stands in, and the note says so.
    """
    from ldm.assets import DEMO_CHECKPOINT
    from ldm.checkpoint import load_config_from_checkpoint
    from ldm.generate import generate, seeded_noise
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.util import instantiate_from_config

    _check_impl(impl)
    path = checkpoint or DEMO_CHECKPOINT
    found = os.path.isfile(path)
    config = load_config_from_checkpoint(path) if found else demo_model_config()
    size = int(config.get("image_size", 64))
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(n_images)]
    seeds = list(range(n_images))
    work = Work("txt2img/demo", f"{n_images} image(s) {size}x{size}, DDIM {DDIM_STEPS}, guidance {GUIDANCE_SCALE:g}",
                compared="pixels", per="image", items=n_images)
    rel = os.path.relpath(path, REPO) if os.path.abspath(path).startswith(REPO + os.sep) else path
    work.note = f"weights: {rel}" if found else f"{rel} MISSING: demo config with random weights"
    work.extra["checkpoint_found"] = found

    ae_params = config["autoencoder"]["params"]
    f = 2 ** (len(ae_params["ddconfig"]["ch_mult"]) - 1)
    latent_shape = (int(ae_params["embed_dim"]), size // f, size // f)
    model = None
    if impl in ("both", "ours"):
        if found and perturb:
            model = LatentDiffusion.from_checkpoint(path).eval()
        else:  # no checkpoint, or a memory run (random weights on both sides, no file loading)
            torch.manual_seed(0)
            model = LatentDiffusion.from_config(config).eval()
            _perturbed(model.unet, perturb, seed=1)
            _perturbed(model.first_stage_model, perturb, seed=2)
        sampler = model.build_sampler({"name": "ddim", "num_steps": DDIM_STEPS, "eta": 0.0})

        def generate_with(m, autocast=None) -> torch.Tensor:
            return generate(m, prompts, sampler, seeds, guidance_scale=GUIDANCE_SCALE, height=size, width=size,
                            batch_size=n_images, progress=False, autocast=autocast)

        work.ours = lambda: generate_with(model)

        def variants(compile: bool = True) -> dict:
            from ldm.generate import autocast_for
            from ldm.inference import prepare_for_inference

            channels_last = prepare_for_inference(copy.deepcopy(model), channels_last=True)
            found = {
                "bf16 autocast (UNet)": lambda: generate_with(model, autocast_for("cpu", "bf16")),
                "channels_last": lambda: generate_with(channels_last),
            }
            if compile:
                compiled = prepare_for_inference(copy.deepcopy(model), channels_last=False, compile=True)
                found["torch.compile"] = lambda: generate_with(compiled)
                found["torch.compile + bf16 autocast (UNet)"] = lambda: generate_with(compiled,
                                                                                      autocast_for("cpu", "bf16"))
            return found

        work.make_variants = variants
    if impl in ("both", "diffusers"):
        from benchmarks.diffusers_compat import diffusers_ddim_scheduler, to_diffusers_unet, to_diffusers_vae

        if model is not None:
            encode, scale_factor = model.encode_text, model.scale_factor
            unet_state, vae_state = model.unet.state_dict(), model.first_stage_model.state_dict()
        else:  # memory run: only the text encoder of ours, random weights elsewhere
            text_encoder = instantiate_from_config(config["text_encoder"], path="text_encoder").eval()
            encode, scale_factor = text_encoder.encode, float(config["scale_factor"])
            unet_state = vae_state = None
        unet = to_diffusers_unet(config["unet"]["params"], unet_state, sample_size=latent_shape[-1])
        vae = to_diffusers_vae(ae_params["ddconfig"], ae_params["embed_dim"], vae_state, scale_factor=scale_factor)
        spacing = config.get("sampler_defaults", {}).get("ddim", {}).get("timestep_spacing", "leading")
        scheduler = diffusers_ddim_scheduler(config["schedule"]["params"], config.get("parameterization", "eps"), spacing)

        empty: list = []  # the empty prompt's context, computed once (as ours caches it)

        @torch.no_grad()
        def their_generate(unet=unet, decoder=vae.decoder, bf16: bool = False) -> torch.Tensor:
            context = encode(prompts)
            if not empty:
                empty.append(encode([""]))
            both = torch.cat([empty[0].expand(n_images, -1, -1), context])
            x = seeded_noise(latent_shape, seeds) * scheduler.init_noise_sigma
            scheduler.set_timesteps(DDIM_STEPS)
            for t in scheduler.timesteps:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the UNet only, as ours
                    out = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.float()
                out_u, out_c = out.chunk(2)
                x = scheduler.step(out_u + GUIDANCE_SCALE * (out_c - out_u), t, x).prev_sample
            return decoder(vae.post_quant_conv(x / vae.config.scaling_factor)).clamp(-1, 1)

        work.theirs = their_generate

        def their_variants(compile: bool = True) -> dict:
            # named as ours: ours compiles the UNet and the decoder (ldm.inference.prepare_for_inference)
            found = {"bf16 autocast (UNet)": lambda: their_generate(bf16=True)}
            if compile:
                compiled_unet, compiled_decoder = _compiled(unet), _compiled(vae.decoder)
                found["torch.compile"] = lambda: their_generate(compiled_unet, compiled_decoder)
                found["torch.compile + bf16 autocast (UNet)"] = lambda: their_generate(compiled_unet, compiled_decoder,
                                                                                       bf16=True)
            return found

        work.make_their_variants = their_variants
    return work


# ---------------------------------------------------------------------------------------------------- registry

CASES = (
    "unet_step/demo",
    "unet_step/sd-v1",
    "unet_train/demo",
    "unet_train/sd-v1",
    "vae_decode/demo",
    "vae_decode/kl-f8",
    "txt2img/demo",
)
QUICK_SKIPS = ("unet_train/sd-v1",)


def build(case: str, impl: str = "both", quick: bool = False, perturb: bool = True,
          checkpoint: Optional[str] = None) -> Work:
    """The :class:`Work` of ``case`` (one of :data:`CASES`); ``perturb=False`` for memory runs (values do not matter).

    ``checkpoint``: the txt2img weights (default: the shipped demo model).
    """
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose from {list(CASES)}")
    kind, name = case.split("/")
    if kind == "unet_step":
        return unet_step(name, impl, perturb)
    if kind == "unet_train":
        return unet_train(name, impl, perturb)
    if kind == "vae_decode":
        return vae_decode(name, impl, perturb)
    return txt2img(impl, n_images=1 if quick else 4, perturb=perturb, checkpoint=checkpoint)
