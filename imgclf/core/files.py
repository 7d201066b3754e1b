"""Atomic, durable output writing; checksums; the error a user can act on.

Every stage writes its outputs through :func:`atomic_path`: the data goes to a temporary name
in the destination's own folder and is renamed into place only when complete, so an
interrupted stage never leaves a half-written file that looks whole (rename is atomic
within one filesystem, which is why the temporary lives beside the target). The data is
fsynced before the rename and the folder after it, so a power cut cannot leave a renamed
file whose data never reached the disk (a truncated checkpoint, issue 9).

A write that the operating system refuses (a full disk, a file-size limit, a read-only or
forbidden folder) becomes one :class:`OutputError` naming the output and the cause, with the
temporary removed and the previous output, if any, untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class PipelineError(Exception):
    """An error a user can act on; stages print its message alone, without a traceback."""


class OutputError(PipelineError):
    """An output could not be written: ``target`` and the operating system's ``cause``."""

    def __init__(self, target: Path, cause: str):
        super().__init__(f"cannot write {target}: {cause}")
        self.target = target
        self.cause = cause


# Errors of a write itself: an OSError without a file name (a failed write() or flush) is
# taken as the output's only with one of these numbers.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _within(path: Any, tmp: Path | None, target: Path) -> bool:
    """Whether an error's file name is this output's: the temporary (or inside it), the target,
    or its folder."""
    if path is None or tmp is None:
        return False
    p, tmp, target = Path(os.fsdecode(path)).absolute(), tmp.absolute(), target.absolute()
    return p in (tmp, target, target.parent) or tmp in p.parents


# The temporaries of the atomic_path blocks now open, innermost last: torch's failed write
# names no file, so the blocks agree on which temporary it was writing (see _written_by_torch).
_ACTIVE: list[Path] = []


def _last_write(tmp: Path) -> tuple[int, int]:
    """(mtime in ns, size) of the temporary, or of the newest file in a folder temporary."""
    files = [tmp] if not tmp.is_dir() else [Path(d) / f for d, _, fs in os.walk(tmp) for f in fs]
    stats = []
    for f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            stats.append((st.st_mtime_ns, st.st_size))
    return max(stats, default=(0, 0))


def _written_by_torch(e: RuntimeError) -> Path | None:
    """The open temporary a failed ``torch.save`` was writing: of those holding data, the
    last written (then the larger: timestamps are coarse); the innermost if none holds any.
    Decided once, by the innermost block, while every temporary still exists, and kept on
    the exception for the outer blocks."""
    if not hasattr(e, "_imgclf_written"):
        written = {tmp: _last_write(tmp) for tmp in _ACTIVE}
        candidates = [tmp for tmp, (_, size) in written.items() if size > 0]
        best = max(candidates, key=lambda t: written[t]) if candidates else (_ACTIVE or [None])[-1]
        e._imgclf_written = best  # type: ignore[attr-defined]
    return e._imgclf_written  # type: ignore[attr-defined]


def _torch_write_cause(e: RuntimeError, folder: Path, tmp: Path) -> str | None:
    """The cause of a failed ``torch.save(obj, path)`` into ``tmp``, or None if ``e`` is
    something else (or torch was writing another block's temporary).

    Given a path, torch's C++ writer reports a failed write as ``unexpected pos N vs M`` and
    loses the errno, so the likely causes are checked here while the temporary still holds
    the space it took: a full filesystem, then a file-size limit.
    """
    msg = str(e)
    if "inline_container.cc" not in msg and "PytorchStreamWriter" not in msg:
        return None
    if _written_by_torch(e) != tmp:
        return None
    if "strerror: " in msg:  # opening failed: torch quotes the OS's reason
        return msg.split("strerror: ", 1)[1].strip()
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return f"No space left on device (ENOSPC): {st.f_bavail * st.f_frsize} bytes free in {folder}"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and _last_write(tmp)[1] >= limit:
        return f"File too large (EFBIG): this process may not write files over {limit} bytes (ulimit -f)"
    return f"the write failed ({msg.splitlines()[0]})"


def _cause(e: BaseException, tmp: Path | None, target: Path, *, in_body: bool) -> str | None:
    """Why writing ``target`` failed, if ``e`` is the operating system refusing this output.

    Outside the caller's block every OSError is this output's (creating the temporary,
    fsync, rename). Inside it, only one naming this output's paths, or a failed write with
    no file name, is: the block may read other files, whose errors are not ours to rename.
    """
    # torch.save to a file object wraps the OSError: it is the RuntimeError's context.
    for err in (e, e.__context__) if isinstance(e, RuntimeError) else (e,):
        if isinstance(err, OSError) and (
            not in_body
            or _within(err.filename, tmp, target) or _within(err.filename2, tmp, target)
            or (err.filename is None and err.errno in _WRITE_ERRNOS)
        ):
            return describe_os_error(err)
    if isinstance(e, RuntimeError) and tmp is not None:
        return _torch_write_cause(e, target.parent, tmp)
    return None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On success the data (every file, for a folder) is fsynced before the rename and the
    containing folder after it. On any exception the temporary is removed and ``target`` is
    left as it was; the operating system refusing the write (see :func:`_cause`) is raised
    as :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    prefix = f".{target.name}.tmp-"
    tmp: Path | None = None
    in_body = False
    try:
        if target.parent.exists() and not target.parent.is_dir():
            raise OutputError(target, f"{target.parent} is a file, not a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get normal permissions
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
        _ACTIVE.append(tmp)
        in_body = True
        yield tmp
        in_body = False
        if is_dir:
            _fsync_tree(tmp)
            if target.exists():
                shutil.rmtree(target)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
            _fsync(tmp)
        _ACTIVE.remove(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)  # the rename itself
    except BaseException as e:
        cause = _cause(e, tmp, target, in_body=in_body)
        if tmp in _ACTIVE:
            _ACTIVE.remove(tmp)
        if tmp is not None:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            if isinstance(e, OutputError) and tmp.absolute() in e.target.absolute().parents:
                # A file inside this folder output: name the output, and the file within it.
                raise OutputError(target, f"{e.target.absolute().relative_to(tmp.absolute())}: {e.cause}") from None
        if cause is not None:
            raise OutputError(target, cause) from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
