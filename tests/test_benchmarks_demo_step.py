"""benchmarks/demo_step.py: variant parsing and one timed run on the tiny config."""

import json
import math

import pytest

from benchmarks import demo_step
from tests.helpers import TINY_DIFFUSION_CONFIG


def test_variants_parse_and_combine():
    assert demo_step.parse_variant("base") == {}
    assert demo_step.parse_variant("width=64+channels_last") == {"width": 64, "channels_last": True}
    assert demo_step.parse_variant("batch=16+compile") == {"batch": 16, "compile": True}
    assert demo_step.parse_variant("heads=16+bf16") == {"heads": 16, "bf16": True}


@pytest.mark.parametrize("bad", ["width=0", "batch=x", "fast", "channels_last=1", "heads=-8"])
def test_bad_variant_is_named(bad):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
        demo_step.parse_variant(bad)


def test_timed_run_reports_each_variant(tmp_path):
    out = tmp_path / "step.json"
    result = demo_step.main(["--config", TINY_DIFFUSION_CONFIG, "--variants", "base", "batch=8", "channels_last",
                             "--warmup", "1", "--min-repeats", "2", "--max-repeats", "2", "--budget-s", "0",
                             "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = result["variants"]
    assert set(rows) == {"base", "batch=8", "channels_last"}
    assert all(row["repeats"] == 3 and row["ms_per_step"] > 0 for row in rows.values())  # 2 rounded up to 3 x 1
    assert rows["batch=8"]["images_per_s"] == pytest.approx(8 / rows["batch=8"]["ms_per_step"] * 1e3)
    assert rows["base"]["images_per_s"] == pytest.approx(4 / rows["base"]["ms_per_step"] * 1e3)  # the config's 4


def test_the_demo_config_step_gives_its_unet_the_pooled_prompt():
    from ldm.util import load_config, to_container

    config = to_container(load_config("configs/demo/diffusion.yaml"))
    assert config["model"]["pooled_context"] == "mean"  # the demo's UNet needs y: the step must pass it
    step = demo_step.make_step(config, {"batch": 2})
    assert math.isfinite(step()) and math.isfinite(step())
