#!/usr/bin/env python
"""Seconds per training step of the demo UNet, for the step-time and fixed-budget levers of ``make demo``.

    python benchmarks/demo_step.py [--config configs/demo/diffusion.yaml] [--variants base channels_last compile \
        width=64 batch=64] [--budget-s 60] [--json OUT]

One step = the UNet's forward and backward on a batch of latents (``B x 4 x 16 x 16``) and text contexts
(``B x max_length x context_dim``), the v-loss, and AdamW: the part of a demo step that width, batch size, memory
format and ``torch.compile`` change (encoding and the text tower are measured in README's step breakdown).
Variants are timed round-robin in one process (``harness.alternate``), so their ratios are fair on a shared machine.

A variant is ``base``, ``channels_last``, ``compile`` (inductor, default mode), ``bf16`` (the forward in bf16
autocast, as Lightning's bf16-mixed; meaningful only on a CPU with native bf16), ``width=N`` (model_channels N, a
multiple of GroupNorm's 32 groups; the heads keep ``num_head_channels``), ``heads=N`` (``num_head_channels`` N: more,
narrower heads) or ``batch=N``; ``+`` combines them
(``width=64+batch=16``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.harness import alternate, cpu_name, markdown_table  # noqa: E402


def parse_variant(text: str) -> dict[str, Any]:
    """``"width=48+channels_last"`` -> ``{"width": 48, "channels_last": True}``; ``base`` is the empty variant."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split("+")):
        key, _, value = part.partition("=")
        if key in ("width", "batch", "heads"):
            if not value.isdigit() or int(value) <= 0:
                raise ValueError(f"variant {text!r}: {key} needs a positive integer, got {value!r}")
            out[key] = int(value)
        elif key in ("channels_last", "compile", "bf16") and not value:
            out[key] = True
        elif key != "base" or value:
            raise ValueError(
                f"variant {text!r}: unknown part {part!r} "
                "(base, channels_last, compile, bf16, width=N, batch=N, heads=N)"
            )
    return out


def make_step(config: Any, variant: dict[str, Any], seed: int = 0) -> Callable[[], float]:
    """A closure running one training step of the config's UNet as ``variant`` changes it; returns the loss."""
    from ldm.models.latent_diffusion import pool_context
    from ldm.util import instantiate_from_config

    unet_cfg = copy.deepcopy(config["model"]["unet"])
    params = unet_cfg["params"]
    if "width" in variant:
        params["model_channels"] = variant["width"]
    if "heads" in variant:
        params["num_head_channels"] = variant["heads"]
    batch = variant.get("batch", int(config["data"]["batch_size"]))
    torch.manual_seed(seed)
    unet = instantiate_from_config(unet_cfg).train()
    memory_format = torch.channels_last if variant.get("channels_last") else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    forward = torch.compile(unet) if variant.get("compile") else unet
    trainer = config["trainer"]["params"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=float(trainer.get("learning_rate", 1e-4)),
                                  weight_decay=float(trainer.get("weight_decay", 0.01)))  # DiffusionTrainer's defaults
    g = torch.Generator().manual_seed(seed)
    size = int(params["image_size"])
    x = torch.randn(batch, int(params["in_channels"]), size, size, generator=g).contiguous(memory_format=memory_format)
    length = int(config["model"]["text_encoder"]["params"].get("max_length", 77))
    context = torch.randn(batch, length, int(params["context_dim"]), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(x.shape, generator=g)
    pooled = config["model"].get("pooled_context")  # the model's wrapper gives such a UNet the pooled prompt as y

    bf16 = bool(variant.get("bf16"))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        y = None if pooled is None else pool_context(context, pooled)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, t, context=context, y=y)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "demo", "diffusion.yaml"))
    parser.add_argument("--variants", nargs="+", default=["base", "channels_last", "compile"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (compiling happens here)")
    parser.add_argument("--min-repeats", type=int, default=6)
    parser.add_argument("--max-repeats", type=int, default=60)
    parser.add_argument("--budget-s", type=float, default=60.0, help="time for the timed rounds")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from ldm.util import load_config, to_container

    config = to_container(load_config(args.config))
    variants = {name: parse_variant(name) for name in args.variants}
    steps = {name: make_step(config, v) for name, v in variants.items()}
    first_s = {}
    for name, step in steps.items():  # the first call alone: what compiling costs, once per run
        start = time.perf_counter()
        step()
        first_s[name] = time.perf_counter() - start
    times = alternate(steps, warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                      budget_s=args.budget_s)
    base = args.variants[0]
    base_ms = statistics.median(times[base]) * 1e3
    rows, result = [], {"cpu": cpu_name(), "threads": torch.get_num_threads(), "config": args.config, "variants": {}}
    for name in args.variants:
        ms = statistics.median(times[name]) * 1e3
        batch = variants[name].get("batch", int(config["data"]["batch_size"]))
        result["variants"][name] = {"ms_per_step": ms, "images_per_s": batch / ms * 1e3, "repeats": len(times[name]),
                                    "first_step_s": first_s[name]}
        rows.append([name, f"{ms:.1f}", f"{batch / ms * 1e3:.0f}", f"{ms / base_ms:.2f}", f"{first_s[name]:.1f}"])
    print(f"{result['cpu']}, {result['threads']} threads, {args.config}")
    print(markdown_table(["variant", "ms / step", "images / s", f"vs {base}", "first step (s)"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
