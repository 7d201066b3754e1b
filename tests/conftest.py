"""Shared fixtures: tiny official-format archives, a local HTTP server, a project copy.

The helpers they use (and the tests import) live in ``helpers.py``.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from imgclf.cifar_writer import write_archive
from imgclf.files import file_digest

from helpers import CLASSES, FAST_EXPORT, FAST_TRAIN, Project, copy_project, make_split


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (tests/test_cuda.py) run only where PyTorch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A folder holding `cifar-10-python.tar.gz`: 200 train and 50 test images."""
    d = tmp_path_factory.mktemp("cifar")
    write_archive(d / "cifar-10-python.tar.gz", make_split(200, 0), make_split(50, 1), CLASSES)
    return d


@pytest.fixture(scope="session")
def cifar_archive(cifar_dir) -> Path:
    return cifar_dir / "cifar-10-python.tar.gz"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="session")
def http_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="session")
def http_server(http_root, cifar_archive) -> str:
    """Base URL of an HTTP server on 127.0.0.1 serving `http_root` (the archive included)."""
    shutil.copy(cifar_archive, http_root / cifar_archive.name)
    handler = functools.partial(_QuietHandler, directory=str(http_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def project(tmp_path, http_server, cifar_archive) -> Project:
    """A copy of the project as a fresh git repo, downloading the tiny archive over HTTP and
    training with FAST_TRAIN, exporting without the serving files (FAST_EXPORT)."""
    proj = Project(copy_project(tmp_path / "proj"))
    proj.set_params(download={"url": f"{http_server}/{cifar_archive.name}", "md5": file_digest(cifar_archive)},
                    train=FAST_TRAIN, export=FAST_EXPORT)
    proj.git("init", "-q", "-b", "main")
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "project copy")
    return proj
