"""What every stage script shares: logging setup, and every failure a user can act on turned
into one line on stderr (no traceback): a PipelineError, or the operating system refusing a
read or a write (a full disk, a read-only or forbidden folder)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from .errors import PipelineError, describe_os_error


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
    except OSError as e:
        # Outputs are written by atomic_path, which names them (an OutputError, above); this is
        # everything else the system refused: reading an input, making a folder.
        where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
        print(f"error ({name}): {where}{describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
