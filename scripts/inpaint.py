"""``ldm inpaint`` as a script path: the code is in ``ldm/cli/inpaint.py``."""

from ldm.cli import run
from ldm.cli.inpaint import *  # noqa: F401,F403  (the module's names, for code that imports them from here)
from ldm.cli.inpaint import main

if __name__ == "__main__":
    run(main)
