"""``python -m ldm <command> [options]``: the same as the ``ldm`` command."""

from ldm.cli import main

main()
