"""``ldm make-shards`` as a script path: the code is in ``ldm/cli/make_shards.py`` (this file keeps old commands working)."""

from ldm.cli import run
from ldm.cli.make_shards import *  # noqa: F401,F403  (the module's names, for code that imports them from here)
from ldm.cli.make_shards import main

if __name__ == "__main__":
    run(main)
