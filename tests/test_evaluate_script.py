"""scripts/evaluate.py on a tiny trained model: the table, the JSON, and the quality-against-cost sweep."""

import json
import os

import pytest

from scripts import evaluate


def test_evaluate_prints_per_category_accuracy_and_writes_json(trained, tmp_path, capsys):
    weights, _ = trained
    out = tmp_path / "eval.json"
    accuracy = evaluate.main(["--ckpt", weights, "--steps", "2", "--categories", "single", "two_objects",
                              "--json", str(out), "--no-progress", "--grid-dir", str(tmp_path / "grids")])
    assert set(accuracy) == {"single", "two_objects", "overall"}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    report = json.loads(out.read_text())
    from ldm.eval.shapes_eval import EVAL_PROMPTS

    assert report["per_category"]["single"]["n"] == len(EVAL_PROMPTS["single"])
    assert len(report["items"]) == len(EVAL_PROMPTS["single"]) + len(EVAL_PROMPTS["two_objects"])
    assert "| single" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "grids" / "single.png")


def test_sweep_writes_table_json_and_plot(trained, tmp_path):
    weights, _ = trained
    result = evaluate.main(["--ckpt", weights, "--sweep", "--sweep-steps", "1", "2", "--sweep-samplers", "ddim", "heun",
                            "--categories", "single", "--no-progress", "--out-dir", str(tmp_path)])
    rows = result["sweep"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 1), ("ddim", 2), ("heun", 1), ("heun", 2)]
    assert [r["nfe"] for r in rows] == [1, 2, 1, 3]  # Heun: two evaluations a step but one on the last
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert os.path.getsize(tmp_path / name) > 0


def test_unknown_sampler_is_refused(trained):
    with pytest.raises(SystemExit, match="unknown sampler"):
        evaluate.main(["--ckpt", trained[0], "--sampler", "plms"])
