"""Whether the uint8 cache fits: its size from the image count and ``image_size``, against the
memory and the disk this process may use, checked before the images are decoded or resized.

The cache holds ``count x image_size x image_size x 3`` bytes, and preprocess holds it whole in
memory before writing it (one copy: decoded images are gathered block by block, each block
freed once copied). ``image_size: 1024`` makes CIFAR-10's 60,000 images 189 GB: refused here
in one line instead of a MemoryError traceback after minutes of decoding.

Memory is the least of: the kernel's ``MemAvailable``, the cgroup's ``memory.max`` less its
``memory.current`` (a container's limit), and the process's ``RLIMIT_AS`` / ``RLIMIT_DATA``
less what it already uses. Disk is the free space of the folder the cache is written to.
"""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import PipelineError

GB = 10**9


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """cgroup v2: memory.max less memory.current of this process's cgroup, if limited."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _rlimit_available(which: int, used_field: str) -> int | None:
    soft = resource.getrlimit(which)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        return max(0, soft - _status_bytes(used_field))
    except (OSError, StopIteration):
        return soft


def available_memory() -> tuple[int, str]:
    """``(bytes, where that figure comes from)``: the smallest of the limits this process meets."""
    found = [
        (_meminfo_available(), "MemAvailable in /proc/meminfo"),
        (_cgroup_available(), "the cgroup's memory.max"),
        (_rlimit_available(resource.RLIMIT_AS, "VmSize"), "ulimit -v (RLIMIT_AS)"),
        (_rlimit_available(resource.RLIMIT_DATA, "VmData"), "ulimit -d (RLIMIT_DATA)"),
    ]
    known = [(n, where) for n, where in found if n is not None]
    return min(known) if known else (2**63, "no limit found")


def free_disk(folder: str | os.PathLike) -> int:
    """Free bytes where ``folder`` is (or would be) created: its nearest existing ancestor."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class CacheBudget:
    """The memory and disk a cache of ``image_size`` images may take (see the module docstring)."""

    image_size: int
    memory: int
    memory_source: str
    disk: int
    out_dir: str

    @classmethod
    def measure(cls, image_size: int, out_dir: str | os.PathLike) -> CacheBudget:
        memory, source = available_memory()
        return cls(image_size, memory, source, free_disk(out_dir), str(out_dir))

    def image_bytes(self) -> int:
        return self.image_size * self.image_size * 3

    def check(self, count: int, *, at_least: bool = False) -> None:
        """Refuse, in one line, a cache of ``count`` images (``at_least``: and more to come)
        that cannot fit in memory or on disk."""
        need = count * self.image_bytes()
        room, where = min((self.memory, f"of memory available ({self.memory_source})"),
                          (self.disk, f"free on the disk of {self.out_dir}"))
        if need <= room:
            return
        more = "at least " if at_least else ""
        raise PipelineError(
            f"preprocess.image_size = {self.image_size}: a cache of {more}{count:,} images needs {more}"
            f"{need / GB:.1f} GB ({count:,} x {self.image_size} x {self.image_size} x 3 bytes), more than the "
            f"{room / GB:.1f} GB {where}; lower preprocess.image_size or use fewer images; nothing was written"
        )
