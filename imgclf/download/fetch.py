"""Fetch the dataset archive (or pack a local image folder) into ``data/raw/``, verified.

Sources: ``http(s)://`` and ``file://`` URLs, and plain local paths. The bytes stream to a
temporary file beside the output while their md5 is computed; only a verified archive is
renamed into place, so a mismatch or a broken connection leaves nothing at the output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core.errors import PipelineError
from ..core.params import DownloadParams
from ..core.paths import DownloadPaths
from ..core.files import atomic_path, file_digest

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read: large enough that Python overhead is negligible


def _mirror_hint() -> str:
    return (
        "Point download.url at a mirror or a local copy instead, e.g.\n"
        "  dvc exp run -S 'download.url=/path/to/cifar-10-python.tar.gz'\n"
        "or edit download.url in params.yaml (a file:// URL or a plain path both work)."
    )


def local_path(url: str) -> Path | None:
    """The filesystem path a source names, or None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise PipelineError(
            f"download.url = {url!r}: unsupported scheme {parsed.scheme!r}; "
            "use http(s)://, file:// or a local path"
        )
    return Path(url).expanduser()


def source_name(url: str) -> str:
    """The file name the fetched archive gets under data/raw/."""
    path = local_path(url)
    name = path.name if path is not None else Path(urllib.parse.urlparse(url).path).name
    if path is not None and path.is_dir():
        name = f"{name or 'images'}.tar"
    return name or "dataset.archive"


def _copy_stream(src, dst, total: int | None, label: str) -> str:
    h = hashlib.md5()
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None) as bar:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            h.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _fetch_url(url: str, dst: Path, timeout: float) -> str:
    req = urllib.request.Request(url, headers={"User-Agent": "imgclf-pipeline"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(dst, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest = _copy_stream(resp, out, total, "download")
            if total is not None and out.tell() != total:
                raise PipelineError(
                    f"download of {url} ended early: got {out.tell()} of {total} bytes. "
                    + _mirror_hint()
                )
            return digest
    except urllib.error.HTTPError as e:
        raise PipelineError(f"cannot download {url}: HTTP {e.code} {e.reason}. {_mirror_hint()}") from None
    except OSError as e:  # URLError, timeouts, refused connections, resets
        reason = getattr(e, "reason", e)
        raise PipelineError(
            f"cannot reach {url} (timeout {timeout:g} s): {reason}.\n{_mirror_hint()}"
        ) from None


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))
SHOW_REFUSED = 10  # entries named in the error


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """``(name in the archive, path)`` of every regular file under ``folder``, sorted.

    Refuses, naming each, what must not be packed into data/raw (and so into DVC's cache): a
    link whose target lies outside the folder (``/etc/passwd``, ``/dev/zero``), a broken link,
    and special files (devices, FIFOs, sockets; a FIFO would block the read). A link to a file
    inside the folder is packed as that file; links to folders are not followed.
    """
    root = folder.resolve()
    found: list[tuple[str, Path]] = []
    refused: list[str] = []
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = Path(current) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    refused.append(f"{rel}: a link to {os.readlink(path)}, outside {folder}")
                    continue
                if not target.exists():
                    refused.append(f"{rel}: a link to {os.readlink(path)}, which does not exist")
                    continue
            if name in dirs:
                continue  # os.walk descends into real folders, never into links
            mode = path.stat().st_mode
            kind = next((kind for test, kind in _KINDS if test(mode)), None)
            if kind is not None:
                refused.append(f"{rel}: {kind}, not a file")
            elif stat.S_ISREG(mode):
                found.append((rel, path))
    if refused:
        more = f"; and {len(refused) - SHOW_REFUSED} more" if len(refused) > SHOW_REFUSED else ""
        raise PipelineError(
            f"download.url = {str(folder)!r}: refusing to pack {len(refused)} entr{'y' if len(refused) == 1 else 'ies'} "
            f"that {'is' if len(refused) == 1 else 'are'} not a file in the folder: {'; '.join(refused[:SHOW_REFUSED])}"
            f"{more}. Remove them, or copy the files they stand for into the folder"
        )
    return found


def _pack_folder(folder: Path, dst: Path) -> str:
    """Pack an image folder into an uncompressed tar with stable bytes.

    Sorted members with zeroed owner and mtime make the archive depend on file names and
    contents only, so an untouched folder gives a byte-identical archive and DVC reruns
    nothing downstream. What is packed: :func:`_folder_files`.
    """
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _folder_files(folder):
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return file_digest(dst)


def fetch(url: str, out_dir: str | os.PathLike, *, md5: str = "", timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``out_dir/<name>``, verify ``md5`` (if given); return the path.

    ``out_dir`` is replaced atomically: on any failure it is left absent (or as it was).
    """
    out_dir = Path(out_dir)
    name = source_name(url)
    path = local_path(url)
    with atomic_path(out_dir, is_dir=True) as tmp_dir:
        dst = tmp_dir / name
        if path is None:
            log.info("downloading %s", url)
            digest = _fetch_url(url, dst, timeout)
        elif path.is_dir():
            if md5:
                raise PipelineError(
                    f"download.url = {url!r} is a folder; download.md5 applies to archive files only. "
                    "Set download.md5 to '' for a folder source."
                )
            log.info("packing folder %s", path)
            digest = _pack_folder(path, dst)
        elif path.is_file():
            log.info("copying %s", path)
            with open(path, "rb") as src, open(dst, "wb") as out:
                digest = _copy_stream(src, out, path.stat().st_size, "copy")
        else:
            raise PipelineError(
                f"download.url = {url!r}: no such file or folder ({path.resolve()}). "
                + _mirror_hint()
            )
        if md5 and digest != md5:
            raise PipelineError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {digest}. "
                "The file is corrupt or not the dataset; nothing was written. "
                "If you trust this source, set download.md5 to its checksum."
            )
        log.info("wrote %s (%d bytes, md5 %s)", out_dir / name, dst.stat().st_size, digest)
    return out_dir / name


def run(download: DownloadParams, paths: DownloadPaths) -> dict[str, Any]:
    """The download stage: ``download.url`` into ``paths.raw``, verified."""
    archive = fetch(download.url, paths.raw, md5=download.md5, timeout=download.timeout)
    return {"archive": str(archive), "bytes": archive.stat().st_size}
