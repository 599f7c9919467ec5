"""``ldm img2img`` as a script path: the code is in ``ldm/cli/img2img.py``."""

from ldm.cli import run
from ldm.cli.img2img import *  # noqa: F401,F403  (the module's names, for code that imports them from here)
from ldm.cli.img2img import main

if __name__ == "__main__":
    run(main)
