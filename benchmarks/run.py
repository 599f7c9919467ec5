#!/usr/bin/env python
"""CPU benchmarks of our UNet, VAE and txt2img, next to diffusers running the same weights.

    python benchmarks/run.py [--json OUT] [--quick] [--threads N] [--only CASE[,CASE]] [--no-memory] [--no-compile]

Needs diffusers for the comparison columns (``pip install -e .[bench]``); without it only our side is timed.

Per case (see ``benchmarks/cases.py``): the diffusers model gets our weights through diffusers' own
LDM-checkpoint converters (``benchmarks/diffusers_compat.py``), both outputs are compared (max abs diff, and
relative to the largest output value), then ours and diffusers' are called in turn (ours, theirs, ours, ...)
after warm-up, and the medians are reported with their ratio. The UNet step and training step also get their
FLOPs counted (``FlopCounterMode``) and set against the measured rate of a 2048^3 fp32 matmul. Each case is also
timed at the speed settings (bf16 autocast, ``torch.compile``, both; for ours also channels_last), ours and
diffusers' alike, all in one round-robin: each of our settings gets its ratio against diffusers at the same setting
(like with like) and its difference from our fp32 output, and a last row sets each side's fastest setting against
the other's. ``--no-compile`` skips the compiled settings (compiling takes minutes here). Peak resident memory is
measured per case and implementation in a fresh subprocess (its ``VmHWM``, the peak that ``ru_maxrss`` would give
but for the parent's RSS that Linux carries over fork + exec), reported as growth over that process's RSS after its
imports.

``--quick`` (a smoke run): fewer repeats, one image for txt2img, no SD-v1-shaped training step.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.cases import CASES, QUICK_SKIPS, build  # noqa: E402

log = logging.getLogger("benchmarks")

# Largest |ours - diffusers| accepted, relative to max |ours| (gradients and 50-step sampling accumulate more).
TOLERANCE = {"unet_step": 1e-4, "unet_train": 1e-3, "vae_decode": 1e-4, "txt2img": 1e-3}
MEMORY_MARKER = "MEMORY_JSON "


@dataclass
class Settings:
    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float  # timed rounds per case are about this long in all


FULL = Settings(warmup=2, min_repeats=5, max_repeats=20, budget_s=60.0)
QUICK = Settings(warmup=1, min_repeats=2, max_repeats=3, budget_s=5.0)


@dataclass
class Row:
    case: str
    setting: str
    impl: str = "ours vs diffusers"  # or a variant of ours
    per: str = ""
    ours_s: Optional[float] = None
    diffusers_s: Optional[float] = None
    ratio: Optional[float] = None  # ours / diffusers
    repeats: int = 0
    compared: str = ""
    max_abs_diff: Optional[float] = None
    rel_diff: Optional[float] = None
    match: Optional[bool] = None
    flops: Optional[int] = None
    ours_gflops: Optional[float] = None
    diffusers_gflops: Optional[float] = None
    ours_pct_peak: Optional[float] = None
    diffusers_pct_peak: Optional[float] = None
    ours_rss_growth_mb: Optional[float] = None
    diffusers_rss_growth_mb: Optional[float] = None
    ours_peak_rss_mb: Optional[float] = None
    diffusers_peak_rss_mb: Optional[float] = None
    notes: list = field(default_factory=list)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, no SD-v1 training step")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads (default: the usable cores, {harness.available_cores()} here)")
    parser.add_argument("--only", default=None, help=f"comma-separated cases (or substrings of them) from {list(CASES)}")
    parser.add_argument("--checkpoint", default=None,
                        help="txt2img weights (.safetensors with config; default: ldm/assets/demo-shapes.safetensors)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-diffusers", action="store_true", help="time ours only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings (slow to compile)")
    parser.add_argument("--memory-worker", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def selected_cases(args) -> list[str]:
    cases = [c for c in CASES if not (args.quick and c in QUICK_SKIPS)]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(w in c for c in CASES)]
        if unknown:
            raise SystemExit(f"error: --only {unknown} matches no case; cases: {list(CASES)}")
        cases = [c for c in cases if any(w in c for w in wanted)]
    return cases


def diffusers_status(args) -> tuple[bool, str]:
    if args.no_diffusers:
        return False, "disabled (--no-diffusers)"
    try:
        import diffusers

        from benchmarks.diffusers_compat import converters

        diffusers.utils.logging.set_verbosity_error()
        return True, f"diffusers {diffusers.__version__} (converters: {converters().source})"
    except ImportError as error:
        return False, f"diffusers not available ({error}); pip install -e .[bench]"


# ---------------------------------------------------------------------------------------------------- timing


def run_case(case: str, args, settings: Settings, use_diffusers: bool, peak_gflops: float) -> list[Row]:
    kind = case.split("/")[0]
    work = build(case, "both" if use_diffusers else "ours", quick=args.quick, checkpoint=args.checkpoint)
    row = Row(case=case, setting=work.setting, per=work.per, compared=work.compared)
    if work.note:
        row.notes.append(work.note)
    if not use_diffusers:
        row.impl = "ours"

    # Same function? (This first call of each is also a warm-up.)
    reference = work.ours()
    if work.theirs is not None:
        from benchmarks.diffusers_compat import max_abs_diff

        theirs = work.theirs()
        row.max_abs_diff = max_abs_diff(reference, theirs)
        scale = float(reference.detach().abs().max())
        row.rel_diff = row.max_abs_diff / scale if scale > 0 else None
        row.match = row.rel_diff is not None and row.rel_diff <= TOLERANCE[kind]
        row.notes.append(f"{work.compared}: {'match' if row.match else 'MISMATCH'} (max abs ours {scale:.3g}, "
                         f"tolerance {TOLERANCE[kind]:g} relative)")
        del theirs
    if work.flops_fn is not None:
        row.flops = harness.count_flops(work.flops_fn)

    fns = {"ours": work.ours}
    if work.theirs is not None:
        fns["diffusers"] = work.theirs
    times = harness.alternate(fns, settings.warmup, settings.min_repeats, settings.max_repeats, settings.budget_s)
    row.repeats = len(times["ours"])
    call_s = {name: harness.median_or_none(t) for name, t in times.items()}
    row.ours_s = call_s["ours"] / work.items
    if "diffusers" in call_s:
        row.diffusers_s = call_s["diffusers"] / work.items
        row.ratio = row.ours_s / row.diffusers_s
    if row.flops:
        row.ours_gflops = row.flops / call_s["ours"] / 1e9
        row.ours_pct_peak = 100 * row.ours_gflops / peak_gflops
        if "diffusers" in call_s:
            row.diffusers_gflops = row.flops / call_s["diffusers"] / 1e9
            row.diffusers_pct_peak = 100 * row.diffusers_gflops / peak_gflops
    del fns
    rows = [row]
    if work.make_variants is not None:
        rows += time_variants(work, reference, row, settings, peak_gflops, compile=not args.no_compile)
    del work, reference
    gc.collect()
    return rows


def time_variants(work, reference, row: Row, settings: Settings, peak_gflops: float, compile: bool = True) -> list[Row]:
    """Our speed settings (bf16 autocast, channels_last, torch.compile) and diffusers' (the same names, where it has
    them), all in one round-robin with our fp32 default: each of ours gets its ratio against diffusers at the same
    setting (like with like), a setting diffusers lacks against diffusers' fp32; then the best of each side."""
    from benchmarks.diffusers_compat import max_abs_diff

    log.info("  speed settings%s ...", " (compiling first)" if compile else "")
    variants = work.make_variants(compile=compile)
    their_variants = {}
    if work.theirs is not None and work.make_their_variants is not None:
        their_variants = work.make_their_variants(compile=compile)
    scale = float(reference.abs().max())
    diffs = {name: max_abs_diff(reference, fn()) for name, fn in variants.items()}  # also compiles
    their_diffs = {name: max_abs_diff(reference, fn()) for name, fn in their_variants.items()}
    fns = {"fp32": work.ours, **({"diffusers": work.theirs} if work.theirs is not None else {}), **variants,
           **{f"diffusers, {name}": fn for name, fn in their_variants.items()}}
    times = harness.alternate(fns, settings.warmup, settings.min_repeats, settings.max_repeats, settings.budget_s)
    medians = {name: harness.median_or_none(t) for name, t in times.items()}
    base = medians["fp32"]
    rows = []
    for name in variants:
        t = medians[name]
        like = f"diffusers, {name}" if name in their_variants else "diffusers"
        impl = f"ours, {name}" + ("" if work.theirs is None else
                                  f" vs {like if like != 'diffusers' else 'diffusers, fp32 default'}")
        variant = Row(case=row.case, setting=row.setting, impl=impl, per=row.per, ours_s=t / work.items,
                      repeats=len(times[name]), compared=f"{row.compared} vs ours fp32", max_abs_diff=diffs[name],
                      flops=row.flops)
        if like in medians:
            variant.diffusers_s = medians[like] / work.items
            variant.ratio = t / medians[like]
            if name in their_diffs and scale > 0:
                variant.notes.append(f"diffusers' {name} differs from ours fp32 by {their_diffs[name] / scale:.1e} "
                                     f"(relative)")
        variant.rel_diff = diffs[name] / scale if scale > 0 else None
        if row.flops:
            variant.ours_gflops = row.flops / t / 1e9
            variant.ours_pct_peak = 100 * variant.ours_gflops / peak_gflops
            if variant.diffusers_s is not None:
                variant.diffusers_gflops = row.flops / medians[like] / 1e9
                variant.diffusers_pct_peak = 100 * variant.diffusers_gflops / peak_gflops
        variant.notes.append(f"{t / base:.2f}x the time of ours fp32 default layout "
                             f"({harness.fmt_time(base / work.items, row.per)} in the same round-robin)")
        rows.append(variant)
    if their_variants:
        theirs = ["diffusers", *(f"diffusers, {name}" for name in their_variants)]
        rows.append(best_of_each(row, medians, list(variants), theirs, work.items))
    return rows


def best_of_each(row: Row, medians: dict, ours: list, theirs: list, items: int) -> Row:
    """Each side at its fastest setting (the fp32 defaults included), from one round-robin."""
    ours_best = min(["fp32", *ours], key=lambda name: medians[name])
    theirs_best = min(theirs, key=lambda name: medians[name])
    theirs_name = "diffusers, fp32" if theirs_best == "diffusers" else theirs_best
    return Row(case=row.case, setting=row.setting, per=row.per, compared=row.compared,
               impl=f"best of each: ours {ours_best} vs {theirs_name}", ours_s=medians[ours_best] / items,
               diffusers_s=medians[theirs_best] / items, ratio=medians[ours_best] / medians[theirs_best])


# ---------------------------------------------------------------------------------------------------- memory


def memory_worker(args) -> int:
    """Fresh process: imports, then build one side of one case and run it; print peak RSS as JSON."""
    torch.set_num_threads(args.threads or harness.available_cores())
    # Import everything either side needs before the baseline, so the growth is the work's own.
    for name in ("open_clip", "autoencoder", "ldm.generate", "ldm.models.latent_diffusion"):
        importlib.import_module(name)
    if args.impl == "diffusers":
        from benchmarks.diffusers_compat import converters

        diffusers = importlib.import_module("diffusers")
        for name in ("UNet2DConditionModel", "AutoencoderKL", "DDIMScheduler"):  # lazy imports, done now
            getattr(diffusers, name)
        diffusers.utils.logging.set_verbosity_error()
        converters()
    gc.collect()
    baseline = harness.current_rss_mb()
    work = build(args.memory_worker, args.impl, quick=args.quick, perturb=False, checkpoint=args.checkpoint)
    fn = work.ours if args.impl == "ours" else work.theirs
    for _ in range(1 if args.quick else 2):
        fn()
    peak = harness.peak_rss_mb()
    result = {"case": args.memory_worker, "impl": args.impl, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
              "growth_mb": peak - baseline}
    print(MEMORY_MARKER + json.dumps(result), flush=True)
    return 0


def measure_memory(case: str, impl: str, args, threads: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", case, "--impl", impl,
               "--threads", str(threads)] + (["--quick"] if args.quick else [])
    if args.checkpoint:
        command += ["--checkpoint", os.path.abspath(args.checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MEMORY_MARKER):
            return json.loads(line[len(MEMORY_MARKER):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"memory subprocess for {case} ({impl}) exited {done.returncode}: {' / '.join(tail)}")


# ---------------------------------------------------------------------------------------------------- output


def table(rows: list[Row]) -> str:
    header = ["case", "setting", "implementation", "ours", "diffusers", "ours/diffusers", "max abs diff (rel)",
              "GFLOP/s ours / diffusers", "% fp32 matmul rate ours / diffusers", "peak RSS growth MiB ours / diffusers",
              "notes"]
    body = []
    for r in rows:
        diff = "—" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}" + (
            "" if r.rel_diff is None else f" ({r.rel_diff:.1e})")
        body.append([
            r.case, r.setting, r.impl, harness.fmt_time(r.ours_s, r.per), harness.fmt_time(r.diffusers_s, r.per),
            harness.fmt_num(r.ratio, ".2f"), diff, harness.fmt_pair(r.ours_gflops, r.diffusers_gflops, ".1f"),
            harness.fmt_pair(r.ours_pct_peak, r.diffusers_pct_peak, ".0f"),
            harness.fmt_pair(r.ours_rss_growth_mb, r.diffusers_rss_growth_mb, ".0f"), "; ".join(r.notes),
        ])
    return harness.markdown_table(header, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.memory_worker:
        return memory_worker(args)
    started = time.perf_counter()
    threads = args.threads or harness.available_cores()
    torch.set_num_threads(threads)
    cases = selected_cases(args)
    settings = QUICK if args.quick else FULL
    use_diffusers, diffusers_info = diffusers_status(args)

    log.info("measuring the fp32 / bf16 matmul rate (2048^3) ...")
    matmul_repeats = 3 if args.quick else 10
    fp32_gflops = harness.matmul_gflops(2048, torch.float32, matmul_repeats)
    bf16_gflops = harness.matmul_gflops(2048, torch.bfloat16, matmul_repeats)
    flags = harness.cpu_flags()
    machine = {
        "cpu": harness.cpu_name(),
        "usable_cores": harness.available_cores(),
        "threads": threads,
        "bf16_hardware": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers_info,
        "fp32_matmul_gflops": fp32_gflops,
        "bf16_matmul_gflops": bf16_gflops,
    }

    rows: list[Row] = []
    main_rows: dict[str, Row] = {}
    for case in cases:
        log.info("timing %s ...", case)
        try:
            case_rows = run_case(case, args, settings, use_diffusers, fp32_gflops)
        except Exception as error:  # one broken case must not lose the others' numbers
            traceback.print_exc()
            case_rows = [Row(case=case, setting="", notes=[f"FAILED: {type(error).__name__}: {error}"])]
        main_rows[case] = case_rows[0]
        rows.extend(case_rows)
        gc.collect()

    if not args.no_memory:
        for case in cases:
            for impl in ("ours", "diffusers") if use_diffusers else ("ours",):
                log.info("peak memory of %s (%s) in a fresh process ...", case, impl)
                try:
                    mem = measure_memory(case, impl, args, threads)
                except Exception as error:
                    main_rows[case].notes.append(f"memory ({impl}) failed: {error}")
                    continue
                setattr(main_rows[case], f"{impl}_rss_growth_mb", mem["growth_mb"])
                setattr(main_rows[case], f"{impl}_peak_rss_mb", mem["peak_rss_mb"])

    elapsed = time.perf_counter() - started
    lines = [
        f"# Benchmarks ({'quick' if args.quick else 'full'} run, {elapsed:.0f} s)",
        "",
        f"- CPU: {machine['cpu']}, {machine['usable_cores']} usable cores, torch threads {threads}, "
        f"bf16 hardware: {', '.join(machine['bf16_hardware']) or 'none'}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])}",
        f"- torch {torch.__version__}, {diffusers_info}",
        f"- matmul 2048^3: fp32 {fp32_gflops:.1f} GFLOP/s (the '% fp32 matmul rate' reference), bf16 {bf16_gflops:.1f} GFLOP/s",
        f"- times: median of N repeats after warm-up, ours and diffusers called in turn in one process; "
        f"{settings.warmup} warm-up round(s), {settings.min_repeats}-{settings.max_repeats} repeats",
        f"- peak RSS growth: peak RSS (VmHWM) of a fresh process that builds one side of a case and runs it "
        f"{'once' if args.quick else 'twice'}, minus its RSS after imports",
        "",
        table(rows),
    ]
    report = "\n".join(lines)
    print(report)
    if args.json:
        payload = {"machine": machine, "settings": asdict(settings), "quick": args.quick, "elapsed_s": elapsed,
                   "rows": [asdict(r) for r in rows], "markdown": report}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
