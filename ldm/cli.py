"""How the command-line scripts end: a user's mistake is one line ``error: ...`` and exit code 2, a bug a traceback.

User errors are the ones a user can act on: a missing file, a config key or value, a file that is not a model, a
busy run folder, a full disk. Set ``LDM_DEBUG=1`` (or pass ``--debug``) to see the traceback of those too.
"""

from __future__ import annotations

import errno
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
