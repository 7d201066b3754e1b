"""The errors a user can act on: stages print their message alone, without a traceback."""

from __future__ import annotations

import errno
import resource
from pathlib import Path


class PipelineError(Exception):
    """An error a user can act on; stages print its message alone, without a traceback."""


class OutputError(PipelineError):
    """An output could not be written: ``target`` and the operating system's ``cause``."""

    def __init__(self, target: Path, cause: str):
        super().__init__(f"cannot write {target}: {cause}")
        self.target = target
        self.cause = cause


def describe_os_error(e: OSError) -> str:
    """``No space left on device (ENOSPC)``, with the limit for EFBIG."""
    text = e.strerror or str(e)
    if e.errno in errno.errorcode:
        text += f" ({errno.errorcode[e.errno]})"
    if e.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            text += f": this process may not write files over {limit} bytes (ulimit -f)"
    return text
