"""The ``ldm`` command: one entry point with a subcommand per task (``ldm txt2img ...``, ``python -m ldm ...``).

Each subcommand is a module here with ``main(argv)``; ``scripts/<name>.py`` are thin wrappers of the same modules.
A user's mistake ends with one line ``error: ...`` and exit code 2, a bug with a traceback. User errors are the ones
a user can act on: a missing file, a config key or value, a file that is not a model, a busy run folder, a full
disk. Set ``LDM_DEBUG=1`` (or pass ``--debug``) to see the traceback of those too.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from ldm.util import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                                 PermissionError, ConfigError, ValueError)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _user_error_types() -> tuple[type[BaseException], ...]:
    # imported here: each is defined beside the code that raises it
    from ldm.run_folder import RunFolderError

    return USER_ERRORS + (RunFolderError,)


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
        return True
    return isinstance(error, _user_error_types())


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)``; a user error prints ``error: <message>`` (one line) to stderr and exits with 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except SystemExit as stop:
        # scripts stop early with SystemExit("error: ..."): the same one line, the same exit code
        if isinstance(stop.code, str) and stop.code.startswith("error:"):
            print(" ".join(stop.code.split()), file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except Exception as error:  # noqa: BLE001  (sorted into user errors and bugs below)
        if debug or not is_user_error(error):
            raise
        logging.getLogger(__name__).debug("user error", exc_info=True)
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


# subcommand -> (module in ldm.cli, one line for `ldm --help`)
ARGV0: str | None = None  # sys.argv[0] as the process was started, when main() renamed it

COMMANDS = {
    "train-autoencoder": ("train_autoencoder", "train the KL autoencoder (stage 1)"),
    "compute-scale-factor": ("compute_scale_factor", "measure an autoencoder's latent scale factor"),
    "evaluate-autoencoder": ("evaluate_autoencoder", "PSNR / SSIM / LPIPS of an autoencoder"),
    "train-diffusion": ("train_diffusion", "train the text-conditioned UNet (stage 2)"),
    "export": ("export_diffusion", "write the EMA weights of any checkpoint of a run"),
    "txt2img": ("txt2img", "sample images from prompts"),
    "img2img": ("img2img", "edit an image with a prompt (SDEdit)"),
    "inpaint": ("inpaint", "repaint the masked part of an image with a prompt"),
    "evaluate": ("evaluate", "prompt accuracy on the shapes benchmark (and the sampler sweep)"),
    "layout-leak": ("layout_leak", "where a schedule stops hiding the layout"),
    "make-shards": ("make_shards", "write WebDataset tar shards from a captioned image folder"),
    "cache-latents": ("cache_latents", "precompute autoencoder latents (and text contexts) for training"),
    "convert": ("convert_checkpoint", "convert between ours, Stable Diffusion single files and diffusers"),
    "demo": ("demo", "train the shapes demo end to end and sample"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ldm <command> [options]   (ldm <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``ldm <command> [options]``: run one subcommand (see :data:`COMMANDS`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(f"ldm.cli.{COMMANDS[name][0]}")
    global ARGV0
    # what the subcommand's usage line shows; ldm.distributed.relaunchable puts the real one back while training
    ARGV0, sys.argv[0] = sys.argv[0], f"ldm {name}"
    run(module.main, rest)
