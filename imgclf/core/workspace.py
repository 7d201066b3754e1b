"""One stage at a time per workspace: two `dvc exp run` in one folder are refused, not mixed.

``dvc exp run -S train.lr=0.01 & dvc exp run -S train.lr=0.02`` in one workspace: the second
rewrites params.yaml while the first trains, DVC's own locks let both through, and the first
then records ``lr: 0.02`` in dvc.lock beside a model trained with 0.01 (issue 22). Our code can
tell two ways, and each refuses with one line pointing to the safe ways to run experiments
side by side (``--queue`` and ``--temp`` each run in a copy of the workspace):

* a stage holds an exclusive lock on ``.dvc/tmp/imgclf-stage.lock`` while it runs, so a stage
  of a second run started meanwhile is refused, naming the one that runs;
* a stage notes params.yaml's bytes when it starts and fails if they changed by the time it
  ends, so its outputs are never recorded against params it did not use.

Only a DVC project is locked (a folder with ``.dvc/``); torchrun's workers run under their
launcher's lock. The lock is an ``flock``: the kernel drops it when the process ends, however
it ends, so nothing stale is ever left to clean up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import PipelineError
from .files import file_digest

LOCK = Path(".dvc/tmp/imgclf-stage.lock")
SAFE_WAYS = ("queue it (`dvc exp run --queue ...`, then `dvc queue start`) or run it in a "
             "temporary copy of the workspace (`dvc exp run --temp ...`)")


@contextlib.contextmanager
def one_stage_at_a_time(name: str, params: Path = Path("params.yaml")) -> Iterator[None]:
    """Hold the workspace's stage lock while stage ``name`` runs, and check that ``params``
    is unchanged when it ends (see the module docstring); a no-op outside a DVC project."""
    if not LOCK.parent.parent.is_dir() or "LOCAL_RANK" in os.environ:
        yield
        return
    LOCK.parent.mkdir(exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another stage"
            raise PipelineError(
                f"{holder} is running in this workspace; two `dvc exp run` (or `dvc repro`) at once in one "
                f"workspace overwrite each other's params.yaml and outputs. Wait for it, or {SAFE_WAYS}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"stage {name} (pid {os.getpid()})".encode(), 0)
        before = file_digest(params) if params.is_file() else None
        yield
        after = file_digest(params) if params.is_file() else None
        if after != before:
            raise PipelineError(
                f"{params} changed while stage {name} ran (another `dvc exp run` in this workspace?), so its "
                f"outputs do not match the file and are not recorded; rerun it, and {SAFE_WAYS}"
            )
    finally:
        os.close(fd)  # releases the lock
