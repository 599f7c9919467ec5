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
