"""Atomic, durable output writing; checksums.

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
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import OutputError, describe_os_error


# Errors of a write itself: an OSError without a file name (a failed write() or flush) is
# taken as the output's only with one of these numbers.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


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


def _cause(e: BaseException, tmp: Path | None, target: Path, *, in_body: bool) -> str | None:
    """Why writing ``target`` failed, if ``e`` is the operating system refusing this output.

    Outside the caller's block every OSError is this output's (creating the temporary,
    fsync, rename). Inside it, only one naming this output's paths, or a failed write with
    no file name, is: the block may read other files, whose errors are not ours to rename.
    """
    if isinstance(e, OSError) and (
        not in_body
        or _within(e.filename, tmp, target) or _within(e.filename2, tmp, target)
        or (e.filename is None and e.errno in _WRITE_ERRNOS)
    ):
        return describe_os_error(e)
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
        os.replace(tmp, target)
        _fsync(target.parent)  # the rename itself
    except BaseException as e:
        cause = _cause(e, tmp, target, in_body=in_body)
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


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into ``path``, opened here, so that a write the operating system refuses is
    the ``OSError`` it is, naming ``path``. torch's writers (``torch.save``,
    ``torch.export.save``) report a failed write to a file object as a RuntimeError whose
    context is that OSError, which is raised instead; given a path, their C++ writer would
    lose the errno altogether."""
    with open(path, "wb") as f:
        try:
            write(f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                err = e.__context__
                raise OSError(err.errno, err.strerror, os.fspath(path)) from None
            raise


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`write_file`."""
    import torch  # here: the download stage and the tools never need torch

    write_file(path, lambda f: torch.save(obj, f))


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
