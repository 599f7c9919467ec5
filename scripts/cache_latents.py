"""``ldm cache-latents`` as a script path: the code is in ``ldm/cli/cache_latents.py``."""

from ldm.cli import run
from ldm.cli.cache_latents import *  # noqa: F401,F403  (the module's names, for code that imports them from here)
from ldm.cli.cache_latents import main

if __name__ == "__main__":
    run(main)
