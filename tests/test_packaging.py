"""Installed, not only cloned: one `ldm` command with subcommands, old script paths, configs found by name."""

import glob
import os
import subprocess
import sys

import pytest

from ldm.cli import COMMANDS, main
from ldm.util import find_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ldm {name}") and "--threads N" in out


def test_ldm_alone_lists_the_commands_and_a_wrong_one_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and all(name in out for name in COMMANDS)
    with pytest.raises(SystemExit) as info:
        main(["txt2image"])
    assert info.value.code == 2 and capsys.readouterr().err.startswith("error: unknown command 'txt2image'")


def test_old_script_paths_still_work():
    """Every scripts/<name>.py runs as a script (one interpreter for all: each is run as __main__ with --help)."""
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code in (0, None), (path, stop.code)\n"
        "    print('ok', path)\n"
    )
    paths = sorted(glob.glob(os.path.join(ROOT, "scripts", "[a-z]*.py")))
    assert len(paths) == len(COMMANDS)
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok ") == len(paths)


def test_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("demo/diffusion").endswith(os.path.join("configs", "demo", "diffusion.yaml"))
    assert find_config("stable-diffusion/v2-inference-v.yaml").endswith("v2-inference-v.yaml")
    with pytest.raises(FileNotFoundError, match="shipped config: .*demo/autoencoder"):
        find_config("demo/diffusoin")


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """pip install . (not editable) into a fresh folder, then from an empty directory: txt2img with the shipped
    weights, and the demo end to end with 5 + 5 steps."""
    wheels, target, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), ROOT], check=True,
                   timeout=600, capture_output=True)
    wheel = next(wheels.glob("*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True,
                   timeout=600, capture_output=True)
    # the wheel's own package, not the checkout's: PYTHONPATH puts it ahead of the editable install
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import ldm, ldm.util; print(ldm.__file__); "
                            "print(ldm.util.find_config('demo/diffusion'))"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout
    ldm = [sys.executable, str(target / "bin" / "ldm")]

    sample = subprocess.run(ldm + ["txt2img", "--prompt", "a red circle", "--steps", "5", "--no-progress"],
                            cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (empty / "outputs" / "txt2img" / "grid.png").is_file()

    demo = subprocess.run(ldm + ["demo", "--out", "demo", "--diffusion-steps", "5", "--autoencoder-steps", "5"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=1800)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (empty / "demo" / "diffusion" / "model.safetensors").is_file()
    assert (empty / "demo" / "samples" / "grid.png").is_file()
