#!/usr/bin/env python
"""The Python steps of ``benchmarks/gpu_check.sh``: one NVIDIA GPU, each step prints a markdown section.

    python benchmarks/gpu_check.py env | txt2img | attention | unet | vae  [--device cuda] [--quick]

* ``env``: GPU, driver-side versions, bf16 support, xformers / diffusers versions.
* ``txt2img``: the shipped demo model, DDIM, guidance 5, in fp32, bf16 and fp16 autocast on the GPU, each against
  the same images made on the CPU in fp32 (per-image seeds draw the noise on the CPU, so the images must agree);
  none may be black or hold NaN.
* ``attention``: softmax(QK^T/sqrt(d))V at SD-v1's largest attention (4096 tokens, 8 heads of 40) in fp16: PyTorch
  SDPA and xformers (when installed) against the float32 math reference, and their speed.
* ``unet``: one SD-v1-shaped UNet step, 64x64 latents, batch 1, fp16: ours against diffusers'
  ``UNet2DConditionModel`` on the same (random, perturbed) weights, converted by diffusers' own converter; it/s.
* ``vae``: the kl-f8 decoder (SD's VAE shape, random perturbed weights) on 64x64 latents -> 512 px in fp32, fp16, and
  in bf16 as ``txt2img --precision fp16`` decodes (our guard: fp16 VAE decoders overflow into NaN / black images).

A failed check exits with 1 (after printing its section); ``--device cpu --quick`` runs the code paths on the CPU
at small sizes (development only: the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

PROMPTS = ["a red circle", "a small blue square in the top left", "a large green triangle in the bottom right",
           "a red square in the top right and a blue circle in the bottom left"]
# Largest |difference| of mean pixel values (in [-1, 1]) against the CPU fp32 images that still passes. GPU fp32
# differs by TF32 convolutions and kernel order; autocast by its rounding.
TXT2IMG_MEAN_TOLERANCE = {"fp32": 0.01, "bf16": 0.06, "fp16": 0.03}


def slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: a file-name-safe GPU name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def image_problems(images: torch.Tensor) -> list[str]:
    """What is wrong with decoded images ``[N, 3, H, W]`` (in [-1, 1]): NaN / inf values, or an image with no pixel
    above mid-grey (black: what an fp16 overflow turns into after clamping). Empty when all is well."""
    problems = []
    if not bool(torch.isfinite(images).all()):
        problems.append("NaN/inf values")
    brightest = torch.nan_to_num(images.float(), nan=-1.0).amax(dim=(1, 2, 3))
    black = [k for k, value in enumerate(brightest.tolist()) if value <= 0.0]
    if black:
        problems.append(f"black image(s) {black}")
    return problems


def timed(function: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int = 2) -> tuple:
    """``(seconds per call (median), last output)``, synchronising CUDA around each call."""
    out = None
    for _ in range(warmup):
        out = function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# -- steps ----------------------------------------------------------------------------------------------------------


def step_env(device: torch.device, quick: bool) -> bool:
    import importlib.metadata as metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    print("## Environment\n")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
              f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        print(f"- CUDA (torch build) {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"- device: {device} (no GPU: development run)")
    print(f"- torch {torch.__version__}, diffusers {version('diffusers')}, xformers {version('xformers')}, "
          f"torchmetrics {version('torchmetrics')}")
    print(f"- TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN conv {torch.backends.cudnn.allow_tf32}\n")
    return True


def step_txt2img(device: torch.device, quick: bool) -> bool:
    from ldm.assets import DEMO_CHECKPOINT
    from ldm.eval.shapes_eval import score_prompt
    from ldm.generate import autocast_for, generate
    from ldm.models.latent_diffusion import LatentDiffusion

    steps = 5 if quick else 20
    prompts = PROMPTS[:2] if quick else PROMPTS
    seeds = list(range(len(prompts)))
    model = LatentDiffusion.from_checkpoint(DEMO_CHECKPOINT).eval()
    sampler = model.build_sampler({"name": "ddim", "num_steps": steps})

    def run(precision: str, on: torch.device) -> tuple[float, torch.Tensor]:
        model.to(on)
        decode = torch.float32
        if on.type == "cuda" and precision == "fp16" and torch.cuda.is_bf16_supported():
            decode = torch.bfloat16  # what txt2img does: fp16 VAE decoders overflow into black images
        model.first_stage_model.to(decode)
        try:
            return timed(lambda: generate(model, prompts, sampler, seeds, guidance_scale=5.0, batch_size=len(prompts),
                                          progress=False, autocast=autocast_for(on, precision), decode_dtype=decode),
                         on, repeats=1, warmup=0 if on.type == "cpu" else 1)
        finally:
            model.first_stage_model.float()

    _, reference = run("fp32", torch.device("cpu"))
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    print(f"## txt2img, shipped demo model, DDIM {steps}, guidance 5, {len(prompts)} images, against CPU fp32\n")
    print("| precision | s / image | max abs diff | mean abs diff | shapes verdicts equal | problems | check |")
    print("|---|---:|---:|---:|---:|---|---|")
    ok = True
    for precision in precisions:
        seconds, images = run(precision, device)
        diff = (images.float() - reference).abs()
        same = sum(score_prompt(p, a)["correct"] == score_prompt(p, b)["correct"]
                   for p, a, b in zip(prompts, images, reference))
        problems = image_problems(images)
        passed = not problems and float(diff.mean()) <= TXT2IMG_MEAN_TOLERANCE[precision]
        ok &= passed
        print(f"| {precision} | {seconds / len(prompts):.3f} | {float(diff.max()):.3g} | {float(diff.mean()):.3g} | "
              f"{same}/{len(prompts)} | {', '.join(problems) or '-'} | {'ok' if passed else 'FAILED'} |")
    print(f"\n(pass: no NaN, no black image, mean abs diff <= {TXT2IMG_MEAN_TOLERANCE})\n")
    return ok


def step_attention(device: torch.device, quick: bool) -> bool:
    from ldm.modules.attention import _xformers, scaled_dot_product_attention

    tokens = 1024 if quick else 4096
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, tokens, 40, generator=generator).to(device, dtype) for _ in range(3))
    reference = scaled_dot_product_attention(q.float(), k.float(), v.float(), backend="math")
    backends = ["sdpa", "math"] + (["xformers"] if device.type == "cuda" and _xformers() is not None else [])
    print(f"## Attention, batch 2, 8 heads x {tokens} tokens x 40, {str(dtype).replace('torch.', '')}\n")
    print("| backend | ms / call | max rel diff vs fp32 math |")
    print("|---|---:|---:|")
    ok = True
    for name in backends:
        seconds, out = timed(lambda: scaled_dot_product_attention(q, k, v, backend=name), device, repeats=20)
        rel = relative_difference(out, reference)
        ok &= rel < 2e-2
        print(f"| {name} | {1e3 * seconds:.3f} | {rel:.2e} |")
    if "xformers" not in backends:
        print("| xformers | not installed (or no CUDA) | - |")
    print()
    return ok


def step_unet(device: torch.device, quick: bool) -> bool:
    from benchmarks.cases import SD_V1_UNET, _our_unet
    from benchmarks.diffusers_compat import to_diffusers_unet

    size = 16 if quick else 64
    params = dict(SD_V1_UNET, image_size=size)
    if quick:
        params.update(model_channels=64, context_dim=64, num_heads=4)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    ours = _our_unet(params, perturb=True)
    theirs = to_diffusers_unet(params, ours.state_dict(), sample_size=size)
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, size, size, generator=generator).to(device, dtype)
    t = torch.full((1,), 500, dtype=torch.int64, device=device)
    context = torch.randn(1, 77, params["context_dim"], generator=generator).to(device, dtype)
    with torch.inference_mode():
        our_s, our_out = timed(lambda: ours(x, t, context=context), device, repeats=3 if quick else 20)
        their_s, their_out = timed(lambda: theirs(x, t, encoder_hidden_states=context).sample, device,
                                   repeats=3 if quick else 20)
    rel = relative_difference(our_out, their_out)
    finite = bool(torch.isfinite(our_out).all() and torch.isfinite(their_out).all())
    ok = finite and rel < (5e-2 if dtype == torch.float16 else 1e-4)
    print(f"## UNet step, SD-v1 shape, latents 4x{size}x{size}, batch 1, {str(dtype).replace('torch.', '')}\n")
    print("| | it/s | ms / step |\n|---|---:|---:|")
    print(f"| ours | {1 / our_s:.1f} | {1e3 * our_s:.2f} |")
    print(f"| diffusers | {1 / their_s:.1f} | {1e3 * their_s:.2f} |")
    print(f"\nours / diffusers time {our_s / their_s:.2f}; max rel diff {rel:.2e}; finite {finite}: "
          f"{'ok' if ok else 'FAILED'}\n")
    return ok


def step_vae(device: torch.device, quick: bool) -> bool:
    from autoencoder import AutoencoderKL
    from benchmarks.cases import vae_specs
    from benchmarks.diffusers_compat import perturb_parameters

    ddconfig, embed_dim, _ = vae_specs()["kl-f8"]
    size = 16 if quick else 64
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig, embed_dim).eval()
    perturb_parameters(model, torch.Generator().manual_seed(1))
    z = torch.randn(1, embed_dim, size, size, generator=torch.Generator().manual_seed(4)).to(device)
    model.to(device)
    dtypes = [("fp32", torch.float32)]
    if device.type == "cuda":
        dtypes += [("fp16", torch.float16)]
        if torch.cuda.is_bf16_supported():
            dtypes += [("bf16 (txt2img's fp16 guard)", torch.bfloat16)]
    print(f"## VAE decode, kl-f8 (random perturbed weights), latents {embed_dim}x{size}x{size} -> {8 * size} px\n")
    print("| decode dtype | ms | finite | max rel diff vs fp32 |\n|---|---:|---|---:|")
    reference = None
    ok = True
    for name, dtype in dtypes:
        model.to(dtype)
        with torch.inference_mode():
            seconds, out = timed(lambda: model.decode(z.to(dtype)).float(), device, repeats=3 if quick else 10, warmup=1)
        finite = bool(torch.isfinite(out).all())
        if reference is None:
            reference = out
        rel = relative_difference(out, reference) if finite else float("nan")
        if not name.startswith("fp16"):  # the fp16 row is reported: that it may overflow is why the guard exists
            ok &= finite
        print(f"| {name} | {1e3 * seconds:.1f} | {finite} | {rel:.2e} |")
    print("\n(txt2img decodes in bf16 when --precision fp16 is asked for on a GPU with bf16, in fp32 otherwise)\n")
    return ok


STEPS = {"env": step_env, "txt2img": step_txt2img, "attention": step_attention, "unet": step_unet, "vae": step_vae}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small sizes (development runs on the CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    return 0 if STEPS[args.step](device, args.quick) else 1


if __name__ == "__main__":
    sys.exit(main())
