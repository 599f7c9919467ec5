"""benchmarks/scale.py: its quick run gives every number the report promises, positive, in JSON and markdown.

The quick settings shrink everything (64 px, a quarter-width kl-f8, six images, two or three repeats), so the data and
training-step parts run in seconds; the 1-vs-2-process part starts train-diffusion subprocesses and is ``slow``.
"""

import json
import math

import pytest

from benchmarks import scale


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_step_seconds_is_the_median_per_step_after_warm_up():
    # steps 0, 1 are warm-up (slow); then 0.1 s a step, one gap of two steps, one outlier of 0.5 s
    points = [(0, 0.0), (1, 5.0), (2, 6.0), (3, 6.1), (5, 6.3), (6, 6.4), (7, 6.9), (8, 7.0)]
    assert scale.step_seconds(points) == pytest.approx(0.1)
    assert scale.step_seconds(points[:3]) is None  # nothing left after the warm-up


def test_train_command_launches_the_asked_processes_on_the_cpu(tmp_path):
    command = scale.train_command(tmp_path / "run", "ae.safetensors", processes=2, batch=3, steps=7)
    assert command[1:4] == ["-m", "ldm", "train-diffusion"]
    assert command[command.index("--devices") + 1] == "2"
    assert command[command.index("--max-steps") + 1] == "7"
    assert {"lightning.accelerator=cpu", "lightning.logger=tensorboard", "lightning.log_every=1",
            "data.batch_size=3"} <= set(command)
    env = scale.subprocess_env(1)
    assert env["LDM_THREADS"] == "1" and "RANK" not in env


def test_quick_data_and_train_step_report(tmp_path):
    out_json, out_md = tmp_path / "scale.json", tmp_path / "scale.md"
    results = scale.main(["--quick", "--only", "data,train", "--json", str(out_json), "--md", str(out_md)])
    saved = json.loads(out_json.read_text())
    assert saved["quick"] is True and set(saved) >= {"machine", "settings", "data", "train", "markdown", "elapsed_s"}
    assert "processes" not in saved

    data = saved["data"]
    assert set(data["sources"]) == {"folder", "shards", "cache"}
    for row in data["sources"].values():
        for key in ("samples_per_s", "batch_s", "load_only_samples_per_s", "load_only_batch_s", "repeats"):
            assert _positive(row[key]), (key, row)
    for key in ("cache_over_folder", "shards_over_folder", "cache_build_s", "cache_build_samples_per_s"):
        assert _positive(data[key]), key
    assert data["latent_shape"] == [4, 8, 8]  # kl-f8 at 64 px
    assert data["cache_over_folder"] > 1  # no encoder to run: the cache is faster whatever the machine's load

    train = saved["train"]
    for key in ("image_step_s", "cached_step_s", "speedup", "unet_params", "autoencoder_params", "repeats"):
        assert _positive(train[key]), key
    assert train["speedup"] == pytest.approx(train["image_step_s"] / train["cached_step_s"])
    assert train["meets_target"] == (train["speedup"] >= scale.TARGET_SPEEDUP)

    markdown = out_md.read_text()
    assert markdown == results["markdown"] == saved["markdown"]
    assert "## 1. Data throughput" in markdown and "## 2. Training step" in markdown
    assert "cache / folder" in markdown and "speed-up with the cache" in markdown


@pytest.mark.slow
def test_quick_one_vs_two_processes(tmp_path):
    """Two train-diffusion runs (1 x 4, 2 x 2): both train the global batch asked for, with a measured step."""
    processes = scale.measure_processes(tmp_path, scale.QUICK)
    assert [(run["processes"], run["per_process_batch"]) for run in processes["runs"]] == [(1, 4), (2, 2)]
    for run in processes["runs"]:
        assert run["ran_as_asked"], run["launch"]
        assert run["steps_logged"] == scale.QUICK.process_steps
        assert _positive(run["step_s"]) and _positive(run["samples_per_s"])
    assert _positive(processes["two_over_one_step_time"])
    assert "not how training scales" in processes["caveat"]
    assert "## 3. One process vs two" in scale.processes_markdown(processes)[0]
