"""The thread default: the idle cores; --threads and LDM_THREADS override it; commands say what they use."""

import logging

import pytest
import torch

from ldm.threads import configure_threads, default_threads


def test_default_is_the_idle_cores_and_at_least_one():
    assert default_threads(cores=2, busy=0.0) == 2      # idle: every core, as torch's own default
    assert default_threads(cores=2, busy=1.0) == 1      # one core busy elsewhere
    assert default_threads(cores=2, busy=7.0) == 1      # never 0
    assert default_threads(cores=16, busy=3.4) == 13


def test_a_running_process_is_counted():
    import subprocess
    import sys
    import time

    from ldm.threads import other_running_tasks

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert other_running_tasks(samples=9) >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_explicit_settings_win_and_are_logged(monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="ldm.threads"):
            assert configure_threads(1) == 1 and torch.get_num_threads() == 1
            monkeypatch.setenv("LDM_THREADS", "2")
            assert configure_threads(None) == 2 and torch.get_num_threads() == 2
        assert "using 1 CPU thread(s) (--threads)" in caplog.text and "(LDM_THREADS)" in caplog.text
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_every_command_takes_threads(capsys):
    import importlib

    for name in ("txt2img", "train_diffusion", "train_autoencoder", "evaluate", "evaluate_autoencoder",
                 "compute_scale_factor", "export_diffusion", "layout_leak", "demo", "convert_checkpoint"):
        with pytest.raises(SystemExit):
            importlib.import_module(f"scripts.{name}").main(["--help"])
        assert "--threads N" in capsys.readouterr().out, name
