"""A throwaway PostgreSQL server for a test: initdb, pg_ctl, a free loopback port, trust
authentication, fsync off; removed afterwards. The server refuses to run as root, so as root it
runs as the `postgres` user where one exists, else `nobody` (setpriv)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a fresh server (database `postgres`, user `imgclf`, no password)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb is not installed (.ci/run installs it with apt-get where it can)")
    as_user: list[str] = []
    # pytest's tmp_path lies under a folder only root may enter: the server's own folder is in /tmp.
    home = Path(tempfile.mkdtemp(prefix="imgclf-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        os.chown(home, user.pw_uid, user.pw_gid)
    data, port = home / "data", _free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, cwd=home, timeout=120)
        if proc.returncode != 0:
            log = (home / "log").read_text() if (home / "log").exists() else ""
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}\n{log}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "imgclf", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
        yield f"postgresql://imgclf@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, cwd=home, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
