"""Read the members of a tar (plain, gz, bz2, xz) or zip archive one by one, safely.

Nothing is extracted: members are read into memory one after another (a tar.gz is streamed,
never seeked back), and every member name is checked before it is handed out. An absolute
name, a ``..`` component, or a link whose target lies outside the archive is refused,
naming the member. The format is told by content (magic bytes), not by the file's name.

An archive that ends early is refused, never read as a shorter complete one: a tar must end
with its zero blocks (``tarfile`` alone takes a tar cut at a member boundary as complete),
a gzip stream is read to its end so its CRC and length are checked, and a zip member's CRC
is checked as it is read. Every such error says "truncated or corrupt archive".

Reading is bounded by :class:`Limits`, checked against the sizes the headers declare before
any byte of a member is read: an archive of more than ``members`` members is refused (a zip
from its end record, before its directory is read; a tar at the member that crosses it); a member larger than ``member_bytes`` cannot be read (the
caller decides whether that fails the stage or skips the member), and an archive whose
members add up to more than ``total_bytes`` uncompressed is refused at the member that crosses
the limit (a zip's total is known from its central directory, before anything is read).
tarfile itself reads pax and GNU long-name headers whole and keeps every member's header;
both are bounded here too, so a small compressed archive cannot expand into gigabytes.
"""

from __future__ import annotations

import functools
import posixpath
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from ..core.errors import PipelineError
from ..core.params import PreprocessParams

MB = 10**6
# A pax or GNU long-name header is read whole by tarfile: names, link targets, extended
# attributes. Real ones are a few hundred bytes; 1 MiB leaves room for large xattrs.
MAX_HEADER_BYTES = 1 << 20
MAX_GLOBAL_HEADER_BYTES = 1 << 20  # global pax headers accumulate for the rest of the archive
MAX_LINK_TARGET_BYTES = 4096  # a zip symlink's target is its data: PATH_MAX on Linux


@dataclass(frozen=True)
class Limits:
    """What reading an archive may cost, in uncompressed bytes (see the module docstring)."""

    member_bytes: int
    total_bytes: int
    members: int = PreprocessParams().max_members  # members of any kind, counted from the headers

    @classmethod
    def of(cls, pre: PreprocessParams) -> Limits:
        return cls(member_bytes=round(pre.max_member_mb * MB), total_bytes=round(pre.max_total_mb * MB),
                   members=pre.max_members)


DEFAULT_LIMITS = Limits.of(PreprocessParams())


class MemberTooLargeError(PipelineError):
    """A member over ``Limits.member_bytes``; ``reason`` is the message without the archive."""

    def __init__(self, archive: Path, name: str, size: int, limit: int):
        self.reason = (
            f"{size / MB:.1f} MB uncompressed, over the limit of {limit / MB:g} MB (preprocess.max_member_mb)"
        )
        super().__init__(f"{archive}: member {name!r}: {self.reason}")


def _total_too_large(archive: Path, name: str, limit: int) -> PipelineError:
    return PipelineError(
        f"{archive}: the archive holds more than {limit / MB:g} MB uncompressed (the limit, "
        f"preprocess.max_total_mb), reached at member {name!r}; refused before reading it"
    )


def too_many_members(archive: Path, count: str, limit: int, where: str) -> PipelineError:
    return PipelineError(
        f"{archive}: the archive holds {count} members, over the limit of {limit:,} (preprocess.max_members), "
        f"{where}; raise the limit if the archive is genuine"
    )


@dataclass
class Member:
    name: str  # as stored in the archive
    path: str  # normalised and checked: relative, no '..', no '.' or empty parts
    kind: Literal["file", "link", "other"]  # "other": folders, devices, fifos
    link_target: str  # "link": the target's path from the archive root (checked)
    read: Callable[[], bytes]  # "file": its bytes; valid only until the next member.
    # Raises MemberTooLargeError, before reading, for a member over Limits.member_bytes.
    size: int = 0  # "file": uncompressed bytes, as its header declares


class NotAnArchiveError(PipelineError):
    """Neither a zip nor a tar, compressed or not (an HTML error page, say); ``detail`` is
    tarfile's own reason, so a caller can add a hint of its own."""

    def __init__(self, archive: Path, detail: str):
        super().__init__(f"{archive}: not a tar, tar.gz or zip archive (tarfile says: {detail})")
        self.detail = detail


_DRIVE = re.compile(r"^[A-Za-z]:")
_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)


def open_archive(path: Path) -> BinaryIO:
    """The archive opened for reading; a missing or unreadable file is a PipelineError."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise PipelineError(f"{path}: cannot open ({e.strerror or e}); run `dvc repro download`") from None


def iter_members(fileobj: BinaryIO, archive: Path, limits: Limits = DEFAULT_LIMITS) -> Iterator[Member]:
    """Members of a zip or a (compressed) tar, in archive order, each name checked.

    ``fileobj`` is the open archive (seekable); ``archive`` only names it in errors.
    """
    head = fileobj.read(8)
    fileobj.seek(0)
    if head[:2] == b"PK" and head[2:4] in (b"\x03\x04", b"\x05\x06", b"\x07\x08"):
        from .zip_members import zip_members  # here: that module builds on this one's names

        return zip_members(fileobj, archive, limits)
    compression = next((c for magic, c in _MAGIC.items() if head.startswith(magic)), "tar")
    return _tar_members(fileobj, archive, compression, limits)


def safe_path(name: str, archive: Path) -> str:
    """The member's normalised path inside the archive; refuses anything that could escape.

    Backslashes count as separators, so a Windows-made ``..\\x`` is caught too.
    """
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise PipelineError(f"{archive}: refusing archive member {name!r}: absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PipelineError(f"{archive}: refusing archive member {name!r}: '..' in its path")
    return "/".join(parts)


def safe_link(name: str, path: str, target: str, archive: Path, *, symlink: bool) -> str:
    """Where a link points, as a path from the archive root; refuses targets outside it.

    A symlink's target is relative to the link's own folder, a tar hardlink's to the root.
    """
    unified = target.replace("\\", "/")
    kind = "symlink" if symlink else "hardlink"
    if unified.startswith("/") or _DRIVE.match(unified):
        raise PipelineError(f"{archive}: refusing archive member {name!r}: {kind} to absolute path {target!r}")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path) if symlink else "", unified))
    if resolved == ".." or resolved.startswith("../"):
        raise PipelineError(
            f"{archive}: refusing archive member {name!r}: {kind} target {target!r} is outside the archive"
        )
    return resolved


def corrupt(archive: Path, e: BaseException, member: str | None = None) -> PipelineError:
    """The error for an archive that ends early or holds bad data, naming where it broke."""
    where = f" (at member {member!r})" if member else ""
    return PipelineError(
        f"{archive}: truncated or corrupt archive{where}: {type(e).__name__}: {e}. "
        "Fetch or pack it again: delete data/raw and rerun `dvc repro download`"
    )


_HEADER_KINDS = {
    tarfile.XHDTYPE: "pax", tarfile.XGLTYPE: "global pax", tarfile.SOLARIS_XHDTYPE: "Solaris extended",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK: "GNU long-link",
}


class _HeaderTooLarge(Exception):
    def __init__(self, info: tarfile.TarInfo, limit: int):
        super().__init__(
            f"refusing a {_HEADER_KINDS[info.type]} header of {info.size:,} bytes at byte {info.offset:,} "
            f"of the tar (at most {limit:,}{' in all' if info.type == tarfile.XGLTYPE else ''})"
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading: only a zero block is a proper end of archive.

    ``TarFile.next()`` silently ends the iteration at a missing, short or garbled header
    after the first one, so a tar cut at a member boundary would otherwise read as complete.
    Also refuses, before tarfile reads it whole, a pax or GNU long-name header over
    MAX_HEADER_BYTES, and global pax headers over MAX_GLOBAL_HEADER_BYTES in all.
    """

    def _proc_member(self, tar):  # type: ignore[override]
        if self.type in _HEADER_KINDS:
            if self.size > MAX_HEADER_BYTES:
                raise _HeaderTooLarge(self, MAX_HEADER_BYTES)
            if self.type == tarfile.XGLTYPE:
                tar._imgclf_global_bytes = getattr(tar, "_imgclf_global_bytes", 0) + self.size
                if tar._imgclf_global_bytes > MAX_GLOBAL_HEADER_BYTES:
                    raise _HeaderTooLarge(self, MAX_GLOBAL_HEADER_BYTES)
        return super()._proc_member(tar)

    @classmethod
    def fromtarfile(cls, tar):  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            tar._imgclf_bad_end = e  # checked by _tar_members after the loop
            raise


def _tar_members(fileobj: BinaryIO, archive: Path, compression: str, limits: Limits) -> Iterator[Member]:
    # "r:gz" reads through GzipFile, which checks the CRC and length at the end of the stream
    # (drained below); tarfile's streaming "r|gz" never checks them. Both read sequentially.
    try:
        tar = tarfile.open(fileobj=fileobj, mode=f"r:{compression}", tarinfo=_CheckedTarInfo)
    except _HeaderTooLarge as e:
        raise PipelineError(f"{archive}: {e}") from None
    except _ARCHIVE_ERRORS as e:
        if compression == "tar" and not _is_ustar(fileobj):
            raise NotAnArchiveError(archive, str(e)) from None
        raise corrupt(archive, e) from None
    current = None
    count = 0
    with tar:
        try:
            while True:
                # tarfile keeps every header it has read (TarFile.members, ~0.5 kB each): drop
                # them, so a million empty members cost nothing. Nothing here looks them up.
                tar.members.clear()
                info = tar.next()
                if info is None:
                    break
                current = info.name
                count += 1
                if count > limits.members:
                    raise too_many_members(archive, f"more than {limits.members:,}", limits.members, f"reached at member {info.name!r}")
                # Where this member's data ends in the uncompressed stream: every byte before it,
                # headers and padding included, counts towards the total.
                if info.offset_data + info.size > limits.total_bytes:
                    raise _total_too_large(archive, info.name, limits.total_bytes)
                path = safe_path(info.name, archive)
                if info.issym() or info.islnk():
                    target = safe_link(info.name, path, info.linkname, archive, symlink=info.issym())
                    yield Member(info.name, path, "link", target, bytes)
                elif info.isfile():
                    read = functools.partial(_read_tar_member, tar, info, archive, limits.member_bytes)
                    yield Member(info.name, path, "file", "", read, info.size)
                else:  # folders, devices, fifos: nothing to read, never created
                    yield Member(info.name, path, "other", "", bytes)
            current = None
            if getattr(tar, "_imgclf_bad_end", None) is not None:
                raise corrupt(archive, tar._imgclf_bad_end, "after the last complete one")
            for _ in iter(lambda: tar.fileobj.read(1 << 20), b""):  # to the end: checks gzip's CRC
                pass
        except PipelineError:
            raise
        except _HeaderTooLarge as e:
            raise PipelineError(f"{archive}: {e}") from None
        except _ARCHIVE_ERRORS as e:
            raise corrupt(archive, e, current) from None


def _read_tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo, archive: Path, limit: int) -> bytes:
    if info.size > limit:
        raise MemberTooLargeError(archive, info.name, info.size, limit)
    try:
        return tar.extractfile(info).read()  # type: ignore[union-attr]
    except _ARCHIVE_ERRORS as e:  # the data ends early, bad compressed data
        raise corrupt(archive, e, info.name) from None


def _is_ustar(fileobj: BinaryIO) -> bool:
    fileobj.seek(257)
    magic = fileobj.read(5)
    fileobj.seek(0)
    return magic == b"ustar"
