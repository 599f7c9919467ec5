"""The benchmark harness's round-robin: every implementation is first in its round equally often."""

from benchmarks import harness


def test_alternate_rotates_which_implementation_goes_first():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "diffusers")}
    times = harness.alternate(fns, warmup=1, min_repeats=5, max_repeats=5, budget_s=0.0)
    assert {name: len(t) for name, t in times.items()} == {"ours": 6, "diffusers": 6}  # 5 rounded up to 2 x 3
    timed = calls[2:]  # after the warm-up round
    rounds = [tuple(timed[i:i + 2]) for i in range(0, len(timed), 2)]
    assert rounds == [("ours", "diffusers"), ("diffusers", "ours")] * 3


def test_alternate_rotation_with_three_implementations():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    harness.alternate(fns, warmup=0, min_repeats=3, max_repeats=3, budget_s=0.0)
    assert calls == list("abc" "bca" "cab")


def test_speed_settings_are_compared_like_with_like(monkeypatch):
    """Each of our settings is set against diffusers at the same setting (fp32 where diffusers lacks it), and the
    last row against each side's fastest; times here are fixed so the pairing, not the clock, is under test."""
    import torch

    from benchmarks import run
    from benchmarks.cases import Work

    out = torch.ones(3)
    seconds = {"fp32": 4.0, "diffusers": 5.0, "bf16 autocast": 2.0, "channels_last": 3.0,
               "diffusers, bf16 autocast": 1.0}
    monkeypatch.setattr(run.harness, "alternate", lambda fns, *a, **k: {name: [seconds[name]] for name in fns})
    work = Work("unet_step/x", "s", ours=lambda: out, theirs=lambda: out,
                make_variants=lambda compile: {"bf16 autocast": lambda: out + 0.5, "channels_last": lambda: out},
                make_their_variants=lambda compile: {"bf16 autocast": lambda: out * 2})
    row = run.Row(case="unet_step/x", setting="s", compared="output")
    rows = run.time_variants(work, out, row, run.QUICK, peak_gflops=1.0, compile=False)

    by_impl = {r.impl: r for r in rows}
    bf16 = by_impl["ours, bf16 autocast vs diffusers, bf16 autocast"]
    assert bf16.ratio == 2.0 and bf16.diffusers_s == 1.0 and bf16.rel_diff == 0.5
    assert any("diffusers' bf16 autocast differs from ours fp32 by 1.0e+00" in n for n in bf16.notes)
    assert by_impl["ours, channels_last vs diffusers, fp32 default"].ratio == 3.0 / 5.0
    best = rows[-1]
    assert best.impl == "best of each: ours bf16 autocast vs diffusers, bf16 autocast" and best.ratio == 2.0
