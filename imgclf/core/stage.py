"""The stage runner: what every stage script is. It sets up logging, validates the whole
params.yaml, and calls the stage's ``run(section, paths)`` with its own params section and
its paths (``imgclf.core.paths.STAGES``); every failure a user can act on becomes one line on
stderr (no traceback): a PipelineError, or the operating system refusing a read or a write
(a full disk, a read-only or forbidden folder). SIGTERM (``kill``, a job scheduler, ``docker
stop``) stops a stage as Ctrl-C does, and says so."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import paths
from .errors import PipelineError, describe_os_error
from .params import load_params, stage_section
from .workspace import one_stage_at_a_time


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so it unwinds as Ctrl-C does (outputs are
    written by atomic_path, so nothing partial is left)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def read_section(name: str) -> Any:
    """The stage's params section, after validating the whole file (every stage does)."""
    return stage_section(load_params(paths.PARAMS), name)


def run_stage(name: str, run: Callable[[Any, Any], object], *, read: Callable[[str], Any] = read_section,
              resumes: str = "") -> None:
    """``run(read(name), paths.STAGES[name])``, under :func:`report_failures`: a stage
    script's whole body. ``read``: how the stage gets its section (train's joining nodes
    also take ``-S`` values). ``resumes``: what a rerun after an interruption picks up (train:
its checkpoint)."""
    if name == "train" and not resumes:
        resumes = f"rerun to resume from the last epoch saved in {paths.STAGES['train'].checkpoint}"
    report_failures(name, lambda: run(read(name), paths.STAGES[name]), resumes=resumes)


def report_failures(name: str, work: Callable[[], object], *, resumes: str = "") -> None:
    """Set up logging and run ``work``; a failure the user can act on is one line and exit 1;
    Ctrl-C and SIGTERM one line too (exit 130, 143), followed by ``resumes`` if given."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, only rank 0 reports progress
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {name}: %(message)s", datefmt="%H:%M:%S",
    )
    try:
        with one_stage_at_a_time(name):
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
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        what = "stopped by SIGTERM" if terminated else "interrupted"
        print(f"{name}: {what}{'; ' + resumes if resumes else ''}", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
