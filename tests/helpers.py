"""What the tests share besides fixtures: tiny data in the official formats, and `Project`,
a throwaway copy of the project driven by real `dvc` and `git` commands.

Everything is built here and served from 127.0.0.1: the suite never touches the network.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from ruamel.yaml import YAML

from imgclf.cache.dataset import Split
from imgclf.core.files import atomic_path, file_digest

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# What a project copy needs: the pipeline definition, the code, the DVC config.
PROJECT_FILES = ["dvc.yaml", "params.yaml", "recipes", "stages", "imgclf", "data/source/README.md", ".dvc/config", ".dvc/plots", ".dvc/.gitignore", ".dvcignore", ".gitignore"]
# Small, fast settings for the later stages so a whole `dvc repro` takes seconds.
FAST_TRAIN = {"epochs": 2, "batch_size": 50, "lr": 0.02, "threads": 1, "device": "cpu", "precision": "fp32"}
# The serving files cost about 13 s per export: on only in the tests that read them.
FAST_EXPORT = {"onnx": False, "pt2": False}
SERVING = {"onnx": True, "pt2": True}


def make_split(n: int, seed: int, num_classes: int = 10, size: int = 32, noise: float = 20) -> Split:
    """Learnable tiny images: each class has its own colour (the same in every split), plus noise."""
    base = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234)) * 200 + 20
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    noise = torch.randn(n, 3, size, size, generator=g) * noise
    images = (base[labels] + noise).clamp(0, 255).to(torch.uint8)
    return Split(images=images, labels=labels)


def preprocessed_cache(folder: Path, train: int, *, noise: float = 20) -> Path:
    """An official-format archive of ``train`` training and 50 test images (`make_split`) in
    ``folder``, preprocessed with the default params: the cache folder, as train() reads it."""
    from imgclf.bench.cifar_writer import write_archive
    from imgclf.core.params import PreprocessParams
    from imgclf.data.preprocess import preprocess

    archive = folder / "cifar-10-python.tar.gz"
    write_archive(archive, make_split(train, 0, noise=noise), make_split(50, 1, noise=noise), CLASSES)
    preprocess(archive, folder / "processed", PreprocessParams())
    return folder / "processed"


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz", links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """``links``: name -> (tarfile.SYMTYPE or LNKTYPE, target)."""
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)
    return path


def default_sigint() -> None:
    """For a child that Ctrl-C must reach (``preexec_fn``): SIGINT handled as a terminal's
    foreground job has it. A test run started as a background job (``make test &``) ignores
    SIGINT, and an ignored signal stays ignored across exec, in dvc and in the stage too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands call `python`: make it this interpreter (the project's venv).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return env


class Project:
    """A throwaway copy of the project, a git repo with DVC, driven by real commands."""

    def __init__(self, path: Path):
        self.path = path

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args), cwd=self.path, env=run_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def git(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("git", *args)

    def params(self) -> dict:
        return YAML(typ="safe").load((self.path / "params.yaml").read_text())  # YAML 1.2, as DVC reads it

    def set_params(self, **sections) -> None:
        """set_params(train={"epochs": 1}) merges into params.yaml."""
        edit_params(self.path / "params.yaml", **sections)

    def reproduce_and_commit(self) -> Path:
        """`dvc repro`, then everything committed: a template for tests to copy (`copy_of`)."""
        self.dvc("repro")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "reproduced")
        return self.path

    def ran_stages(self, proc: subprocess.CompletedProcess) -> list[str]:
        """Names of the stages `dvc repro` actually ran (from its output)."""
        return [
            line.split("'")[1]
            for line in proc.stdout.splitlines()
            if line.startswith("Running stage '")
        ]


def edit_params(path: Path, **sections: dict) -> None:
    """Merge ``sections`` into the params file at ``path`` as a person editing it would: a
    round-trip YAML editor (YAML 1.2, as DVC reads it) that keeps every comment and the order."""
    editor = YAML()  # round-trip
    editor.width = 4096
    params = editor.load(path.read_text())

    def merge(into, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                if into.get(key) is None:
                    into[key] = {}
                merge(into[key], value)
            else:
                into[key] = value

    merge(params, sections)
    with open(path, "w") as f:
        editor.dump(params, f)


def copy_of(template: Path, dst: Path) -> Project:
    """A copy of a project folder as it stands: workspace, git history and DVC cache."""
    return Project(shutil.copytree(template, dst, symlinks=True))


def copy_project(dst: Path) -> Path:
    """Copy what a project needs (PROJECT_FILES) from this checkout to ``dst``."""
    for rel in PROJECT_FILES:
        src = ROOT / rel
        if not src.exists():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, target)
    return dst


def new_project(path: Path, http_server: str, cifar_archive: Path) -> Project:
    """A copy of the project at ``path``, a git repo with one commit, downloading ``cifar_archive``
    from ``http_server``, training with FAST_TRAIN and exporting with FAST_EXPORT."""
    proj = Project(copy_project(path))
    proj.set_params(download={"url": f"{http_server}/{cifar_archive.name}", "md5": file_digest(cifar_archive)},
                    train=FAST_TRAIN, export=FAST_EXPORT)
    proj.git("init", "-q", "-b", "main")
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "project copy")
    return proj


def save_state_bundle(bundle: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)


def save_whole_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(model, tmp)
