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

from imgclf.bench.cifar_writer import write_archive
from imgclf.core.params import PreprocessParams
from imgclf.data.preprocess import preprocess

from helpers import CLASSES, Project, copy_of, make_split, new_project, preprocessed_cache


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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, cifar_archive) -> Path:
    """`cifar_archive` preprocessed: 200 training images (20 held out by default)."""
    out = tmp_path_factory.mktemp("cache") / "processed"
    preprocess(cifar_archive, out, PreprocessParams())
    return out


@pytest.fixture(scope="session")
def learn_cache_dir(tmp_path_factory) -> Path:
    """500 training images, for the tests that judge learning by val_acc: with val_fraction 0.2
    100 are held out, so one image is 0.01 (on the 20 of `cache_dir` it would be 0.05)."""
    return preprocessed_cache(tmp_path_factory.mktemp("learn"), 500)


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
    return new_project(tmp_path / "proj", http_server, cifar_archive)


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory, http_server, cifar_archive) -> Path:
    """The `project` fixture's project after one `dvc repro`, committed: built once a session."""
    return new_project(tmp_path_factory.mktemp("reproduced") / "proj", http_server, cifar_archive).reproduce_and_commit()


@pytest.fixture
def reproduced(reproduced_template, tmp_path) -> Project:
    """Like `project`, after `dvc repro`: a copy of its workspace, git history and DVC cache, so
    a test that starts from an up-to-date pipeline does not train its own. Nothing is out of date."""
    return copy_of(reproduced_template, tmp_path / "proj")
