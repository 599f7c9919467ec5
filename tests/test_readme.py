"""README's code stays true: its Python blocks run as pasted, and every flag its commands use exists."""

import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands():
    """Every ``.venv/bin/python scripts/<name>.py ...`` command in README's bash blocks, continuation lines joined."""
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(".venv/bin/python scripts/"):
                yield line
            elif line.startswith("ldm ") and not line.startswith("ldm --help"):  # ldm <command> -> its module
                from ldm.cli import COMMANDS

                name = line.split()[1]
                assert name in COMMANDS, f"README names an ldm command that does not exist: {line}"
                yield f".venv/bin/python scripts/{COMMANDS[name][0]}.py " + " ".join(line.split()[2:])


def test_python_blocks_run_as_pasted(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert blocks
    monkeypatch.chdir(tmp_path)  # nothing in them may rely on files in the checkout's working directory
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_commands_use_python_from_the_venv_and_existing_flags(capsys):
    import importlib

    commands = list(_commands())
    assert len(commands) > 10
    assert not re.search(r"^(python|python3) ", README, flags=re.M), "a bare `python` fails before make install"
    helps = {}
    for command in commands:
        words = shlex.split(command.replace("<", "_").replace(">", "_").replace("[", " ").replace("]", " "))
        script = os.path.splitext(os.path.basename(words[1]))[0]
        if script not in helps:
            module = importlib.import_module(f"scripts.{script}")
            with pytest.raises(SystemExit):
                module.main(["--help"])
            helps[script] = capsys.readouterr().out
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert re.search(rf"(^|\s|,){re.escape(flag)}\b", helps[script]), f"{script}.py has no {flag}: {command}"
