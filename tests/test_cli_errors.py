"""User errors end with one line ``error: ...`` and exit code 2, no traceback; LDM_DEBUG=1 shows the traceback."""

import os
import subprocess
import sys

import pytest

from ldm.cli import is_user_error, run
from ldm.util import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, *args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(result, pattern):
    import re

    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_user_errors_from_the_commands(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    _one_error_line(_script("txt2img.py", "--prompt", "x", "--ckpt", tmp_path / "missing.safetensors"),
                    r"checkpoint not found: .*missing.safetensors")
    _one_error_line(_script("txt2img.py", "--prompt", "x", "--ckpt", notes), r"notes.txt: not a model file")
    _one_error_line(_script("txt2img.py", "--prompt", "x", "--height", "50", "--outdir", tmp_path / "o"),
                    r"50x\d+ cannot be generated.*multiples of 16")
    _one_error_line(_script("txt2img.py", "--prompt", "x", "--sampler", "nope"), r"unknown sampler 'nope'")
    _one_error_line(_script("layout_leak.py", "--ckpt", notes), r"notes.txt: not a model file")
    _one_error_line(_script("train_diffusion.py", "--config", os.path.join(ROOT, "tests", "configs",
                                                                           "tiny-diffusion.yaml"),
                            "--autoencoder", notes, "--run-dir", tmp_path / "r", "lightning.precison=32-true"),
                    r"lightning.precison \(did you mean lightning.precision\?\)")
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    result = _script("txt2img.py", "--prompt", "x", "--ckpt", notes, env={"LDM_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "not a model file" in result.stderr


def test_a_bug_is_not_dressed_up_as_a_user_error(capsys):
    def buggy(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run(buggy, [])

    def wrong_value(argv):
        raise ConfigError("model.params.x: expected a number")

    with pytest.raises(SystemExit) as info:
        run(wrong_value, [])
    assert info.value.code == 2 and capsys.readouterr().err == "error: model.params.x: expected a number\n"
    assert is_user_error(OSError(28, "no space left on device while writing x"))
    assert not is_user_error(RuntimeError("bug"))
