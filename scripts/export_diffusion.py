"""``ldm export`` as a script path: the code is in ``ldm/cli/export_diffusion.py`` (this file keeps old commands working)."""

from ldm.cli import run
from ldm.cli.export_diffusion import *  # noqa: F401,F403  (the module's names, for code that imports them from here)
from ldm.cli.export_diffusion import main

if __name__ == "__main__":
    run(main)
