#!/usr/bin/env python
"""Load time and peak memory of a full-size Stable Diffusion 2 checkpoint: our loader against diffusers'.

    python benchmarks/sd_load.py [--dir /tmp/sd-load] [--format safetensors|ckpt] [--json OUT]

Builds an SD 2 (v2-inference.yaml) checkpoint with random weights at full size (1.3 B parameters, 5.2 GB in
float32) once, then loads it in fresh subprocesses, one loader each, alternating, each measured by wall time and its
peak resident memory (``VmHWM``) over the process's RSS after imports:

* ours: ``LatentDiffusion.from_single_file(path, config=configs/stable-diffusion/v2-inference.yaml)``;
* diffusers: ``UNet2DConditionModel`` + ``AutoencoderKL`` ``.from_single_file(path, original_config=...)``
  (the text encoder is left out: diffusers takes its config from the Hub for SD 2, and nothing downloads here), so
  diffusers' column covers less work than ours.

Our loader memory-maps the file (copy-on-write), so the load itself reads little; each side is therefore also
timed to the end of its first UNet call at 512 px, which reads every UNet weight.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = os.path.join(REPO, "configs", "stable-diffusion", "v2-inference.yaml")
MARK = "SD_LOAD_JSON "


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def build_checkpoint(path: str) -> None:
    import torch

    from ldm.interop.export import save_sd
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.interop import load_sd_config

    torch.manual_seed(0)
    config = load_sd_config(CONFIG)
    config.pop("variant")
    model = LatentDiffusion.from_config(config)
    if path.endswith(".ckpt"):
        from ldm.interop.export import sd_state_dict

        torch.save({"state_dict": sd_state_dict(model)}, path)
    else:
        save_sd(model, path)


def child(loader: str, path: str) -> None:
    import torch  # imports are not part of what is measured

    if loader == "ours":
        from ldm.models.latent_diffusion import LatentDiffusion
        from ldm.modules.encoders.modules import _open_clip

        _open_clip()  # imported before the clock starts, as diffusers' modules are
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if loader == "ours":
        model = LatentDiffusion.from_single_file(path, config=CONFIG)
        params = sum(p.numel() for p in model.parameters())
    else:
        unet = UNet2DConditionModel.from_single_file(path, original_config=CONFIG)
        vae = AutoencoderKL.from_single_file(path, original_config=CONFIG)
        params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in vae.parameters())
    seconds = time.perf_counter() - start
    peak_after_load = (_rss_kib("VmHWM") - base) / 1024
    # one UNet call at 512 px (64x64 latents): our weights are memory-mapped and come in on first use, so the
    # load alone would flatter us; this reads every UNet weight on both sides
    x = torch.randn(1, 4, 64, 64)
    t = torch.tensor([500])
    context = torch.randn(1, 77, 1024)
    with torch.no_grad():
        if loader == "ours":
            model.model_fn(x, t, context)
        else:
            unet(x, t, encoder_hidden_states=context)
    print(MARK + json.dumps({"loader": loader, "seconds": seconds, "peak_mib": peak_after_load,
                             "seconds_to_first_unet_call": time.perf_counter() - start,
                             "peak_mib_after_first_unet_call": (_rss_kib("VmHWM") - base) / 1024,
                             "parameters": params}), flush=True)


def run_child(loader: str, path: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", loader, "--path", path], capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{loader} failed:\n{result.stderr[-3000:]}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/sd-load")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--loaders", nargs="+", default=["ours", "diffusers"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.path)
        return {}
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"sd2-random.{args.format}")
    if not os.path.isfile(path):
        print(f"building {path} (full-size SD 2, random weights) ...", flush=True)
        build_checkpoint(path)
    print(f"{path}: {os.path.getsize(path) / 2**30:.2f} GiB", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.loaders}
    for _ in range(args.repeats):
        for name in args.loaders:  # alternating, so drift on a shared machine hits both
            runs[name].append(run_child(name, path))
            print(json.dumps(runs[name][-1]), flush=True)
    summary = {name: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                      "peak_mib_max": max(r["peak_mib"] for r in rs),
                      "seconds_to_first_unet_call_median": statistics.median(r["seconds_to_first_unet_call"] for r in rs),
                      "peak_mib_after_first_unet_call_max": max(r["peak_mib_after_first_unet_call"] for r in rs),
                      "parameters": rs[0]["parameters"]}
               for name, rs in runs.items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"file": path, "bytes": os.path.getsize(path), "summary": summary, "runs": runs}, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
