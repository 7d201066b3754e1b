"""Read the members of a zip archive: the zip half of :func:`imgclf.data.archive.iter_members`.

The central directory declares every member and size up front, so the member count (from the
end record, before ``zipfile`` builds one object per member) and the total are checked before
any member is read.
"""

from __future__ import annotations

import stat
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..core.errors import PipelineError
from .archive import (
    _ARCHIVE_ERRORS, MAX_LINK_TARGET_BYTES, Limits, Member, MemberTooLargeError, _total_too_large, corrupt, safe_link,
    safe_path, too_many_members,
)

_END = struct.Struct("<4s4H2LH")  # end of central directory: signature ... entries total at [4]
_END64_LOCATOR = struct.Struct("<4sLQL")  # zip64 locator: signature, disk, offset of the zip64 end record
_END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end record: entries total at [7]


def declared_members(fileobj: BinaryIO) -> int | None:
    """The number of members the zip's end record declares, or None where it cannot be found
    (zipfile then reports the damage)."""
    fileobj.seek(0, 2)
    size = fileobj.tell()
    tail_start = max(0, size - (_END.size + 0xFFFF))  # the record, then a comment of up to 64 KiB
    fileobj.seek(tail_start)
    tail = fileobj.read()
    fileobj.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        return None
    count = _END.unpack_from(tail, at)[4]
    locator_at = at - _END64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at:locator_at + 4] == b"PK\x06\x07":
        offset = _END64_LOCATOR.unpack_from(tail, locator_at)[2]
        fileobj.seek(offset)
        record = fileobj.read(_END64.size)
        fileobj.seek(0)
        if len(record) == _END64.size and record[:4] == b"PK\x06\x06":
            count = max(count, _END64.unpack_from(record)[7])
    return count


def zip_members(fileobj: BinaryIO, archive: Path, limits: Limits) -> Iterator[Member]:
    declared = declared_members(fileobj)
    if declared is not None and declared > limits.members:
        raise too_many_members(archive, f"{declared:,}", limits.members, "as its directory declares; refused before reading it")
    try:
        zf = zipfile.ZipFile(fileobj)
    except _ARCHIVE_ERRORS as e:
        raise corrupt(archive, e) from None
    with zf:
        # The central directory declares every size up front, and zipfile never returns more
        # than a member's declared size: the total is checked before anything is read.
        total = 0
        for info in zf.infolist():
            total += info.file_size
            if total > limits.total_bytes:
                raise _total_too_large(archive, info.filename, limits.total_bytes)
        for info in zf.infolist():
            path = safe_path(info.filename, archive)

            def read(info: zipfile.ZipInfo = info, limit: int = limits.member_bytes) -> bytes:
                if info.file_size > limit:
                    raise MemberTooLargeError(archive, info.filename, info.file_size, limit)
                try:
                    return zf.read(info)
                except (RuntimeError, NotImplementedError) as e:  # encrypted, unsupported method
                    raise PipelineError(f"{archive}: cannot read member {info.filename!r}: {e}") from None
                except _ARCHIVE_ERRORS as e:  # bad CRC, bad compressed data
                    raise corrupt(archive, e, info.filename) from None

            if stat.S_ISLNK(info.external_attr >> 16):  # a Unix symlink: its data is the target
                if info.file_size > MAX_LINK_TARGET_BYTES:
                    raise PipelineError(
                        f"{archive}: refusing archive member {info.filename!r}: a symlink whose "
                        f"target is {info.file_size:,} bytes long (at most {MAX_LINK_TARGET_BYTES})"
                    )
                target = read().decode("utf-8", "surrogateescape")
                target = safe_link(info.filename, path, target, archive, symlink=True)
                yield Member(info.filename, path, "link", target, bytes)
            elif info.is_dir():
                yield Member(info.filename, path, "other", "", bytes)
            else:
                yield Member(info.filename, path, "file", "", read, info.file_size)
