"""What every stage script shares: logging setup and turning PipelineError into one message."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from .files import PipelineError


def run_stage(name: str, work: Callable[[], object]) -> None:
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, only rank 0 reports progress
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {name}: %(message)s", datefmt="%H:%M:%S",
    )
    try:
        work()
    except PipelineError as e:
        # A clear message the user can act on; a traceback would bury it.
        print(f"error ({name}): {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
