"""Logging set-up shared by every entry point: rank 0 at INFO, the other ranks at WARNING.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("pipeline.train")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


DEBUG_ENV = "PIPELINE_DEBUG"
"""Set to 1 to log the traceback behind every error a command reports in one line."""


def one_line(err: BaseException) -> str:
    """The message of a handled error as its reader should see it.

    A DataLoader worker's exception reaches the main process re-raised with the worker's traceback as its text;
    the message is its last line, after the exception's name. An OSError says what failed on which file.
    """
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename:
        return (f"'{err.filename}' is not a folder, or lies under a file, where a folder is needed: remove or rename "
                "that file, or choose another path")
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = (f"{err.strerror}: '{err.filename}'. This is the file system, not the pipeline: make room, fix the "
                "path, the permissions or the mount, then run the same command again")
    elif isinstance(err, OSError):
        text = f"{type(err).__name__}: {err}"
    return text


def report_error(logger: logging.Logger, err: BaseException) -> None:
    """One line for the user; the traceback too when PIPELINE_DEBUG=1."""
    logger.error("%s", one_line(err), exc_info=err if os.environ.get(DEBUG_ENV, "") not in ("", "0") else None)
