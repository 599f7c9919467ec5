"""``ldm compute-scale-factor`` as a script path: the code is in ``ldm/cli/compute_scale_factor.py`` (this file keeps old commands working)."""

from ldm.cli import run
from ldm.cli.compute_scale_factor import *  # noqa: F401,F403  (the module's names, for code that imports them from here)
from ldm.cli.compute_scale_factor import main

if __name__ == "__main__":
    run(main)
