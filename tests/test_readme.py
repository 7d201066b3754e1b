"""The README followed as a newcomer would, offline: its first command and the everyday ones
after it, in order and as written, in a fresh copy of the project; each one's exit status and
what it prints are checked.

The copy's `download.url` names a port on 127.0.0.1 where nothing listens, so `make run` meets
what an offline machine meets (tests never reach another address). Its `.venv` stands for the
one `make run` would create: links to this test run's venv, so that nothing is installed.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import edit_params, run_env

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEST = "data/sample/cifar10-sample/test"

# The README's commands this walk runs, in the README's order.
MAKE_RUN = "make run"
ACTIVATE = ". .venv/bin/activate"
APPLY_DEMO = "dvc exp apply demo"
PREDICT = "imgclf-predict data/sample/cifar10-sample/test/{cat,ship}/0005.jpg"
EXPERIMENT = "dvc exp run -S train.lr=0.1"
DEFAULTS = "git checkout -- params.yaml"
SHOW = "make show"


def readme_commands() -> list[str]:
    """Every command of the README's shell blocks, comments stripped, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def fresh_copy(dst: Path) -> Path:
    """The project as a clone of this checkout would have it (tracked files and new ones git
    does not ignore), committed in a new repo, with `.venv` standing for an installed venv."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())
            (dst / rel).chmod(src.stat().st_mode)
    venv = dst / ".venv"
    venv.mkdir()
    for name in ("bin", "lib", "include", "pyvenv.cfg"):
        if (Path(sys.prefix) / name).exists():
            (venv / name).symlink_to(Path(sys.prefix) / name)
    (venv / ".installed").touch()  # newer than pyproject.toml: `make install` has nothing to do
    return dst


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_from_make_run_to_the_defaults_works_offline(tmp_path):
    commands = readme_commands()
    walk = [MAKE_RUN, ACTIVATE, APPLY_DEMO, PREDICT, EXPERIMENT, DEFAULTS, SHOW]
    positions = [commands.index(c) if c in commands else -1 for c in walk]
    assert -1 not in positions, f"the README no longer says {walk[positions.index(-1)]!r}"
    assert positions == sorted(positions), "the README gives these commands in another order"

    project = fresh_copy(tmp_path / "imgclf")
    offline = f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz"
    edit_params(project / "params.yaml", download={"url": offline})
    env = run_env()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(Path(sys.executable).parent))
    env["COLUMNS"] = "250"  # a wide terminal, for the tables
    for inherited in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS"):  # when the suite itself runs under `make test`
        env.pop(inherited, None)
    for git in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        subprocess.run(["git", *git], cwd=project, env=env, check=True, capture_output=True)
    committed = (project / "params.yaml").read_text()

    def shell(command: str, timeout: float = 600) -> str:
        """One README command in bash in the project; after the README's activate line, with
        the venv activated as it says. Returns what it printed (stdout and stderr)."""
        line = f"{ACTIVATE} && {command}" if command != MAKE_RUN else command
        proc = subprocess.run(["bash", "-c", line], cwd=project, env=env, capture_output=True, text=True,
                              timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command} failed with {proc.returncode}:\n{out}"
        return out

    # make run: the address does not answer, so it says so in one line and runs the demo,
    # whose table shows the test accuracy and whose model classifies four test images.
    out = shell(MAKE_RUN)
    assert f"make run: cannot reach {offline} (" in out and "running the demo" in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert "test_acc" in header and "train_pflop" in header
    demo_row = next(r for r in table[2:] if "[demo]" in r or "demo" in r.split("|")[1])
    test_acc = float(demo_row.strip("|").split("|")[header.index("test_acc")])
    assert 0.1 < test_acc <= 1  # ten classes: above chance
    assert len(re.findall(r"^\S+\.jpg: \w+ \(\d+\.\d%\)", out, flags=re.M)) == 4
    assert "dvc exp apply demo" in out
    assert (project / "params.yaml").read_text() == committed  # the demo ran in a temporary copy
    assert not (project / "models").exists()

    # The demo's params and outputs into the workspace; predict and a new experiment then work offline.
    shell(APPLY_DEMO)
    assert (project / "models/model_state.pt").is_file() and (project / "metrics/eval.json").is_file()
    predicted = shell(PREDICT).splitlines()
    assert [line.split(":")[0] for line in predicted] == [f"{SAMPLE_TEST}/cat/0005.jpg", f"{SAMPLE_TEST}/ship/0005.jpg"]
    assert all(re.search(r": \w+ \(\d+\.\d%\)", line) for line in predicted)
    ran = shell(EXPERIMENT)
    assert "Running stage 'train'" in ran and "Running stage 'download'" not in ran

    # Back to the committed defaults.
    shell(DEFAULTS)
    assert (project / "params.yaml").read_text() == committed

    # make show: a table a terminal holds: the params that differ, the two accuracies, compute
    # and seconds; no dependency hashes, no per-class columns. As CSV, to read it back.
    rows = list(csv.DictReader(io.StringIO(shell(f"{SHOW} A=--csv").strip())))
    columns = list(rows[0])
    for wanted in ("test_acc", "train_pflop", "train_seconds", "train.lr", "model.arch"):
        assert wanted in columns, (wanted, columns)
    val_acc = [c for c in columns if c.endswith("val_acc")]  # none here: the demo holds out no val split
    assert len(val_acc) <= 1 and not [c for c in columns if "/" in c and c not in val_acc], columns
    assert not [c for c in columns if c.startswith("per_class")] and len(columns) < 25, columns
    experiments = {row["Experiment"]: row for row in rows if row["Experiment"]}
    assert len(experiments) == 2 and "demo" in experiments  # the demo and the new one
    assert [float(row["train.lr"]) for name, row in experiments.items() if name != "demo"] == [0.1]
    assert all(0 <= float(row["test_acc"]) <= 1 for row in experiments.values())
    assert "download.md5" not in columns
    # As a table: the accuracies, compute and seconds come first, so a narrow terminal cuts
    # only params off (DVC shows the cut as "…").
    header = shell(SHOW).splitlines()[1].split()
    assert header[:4] == ["Experiment", "train_seconds", "train_pflop", "test_acc"], header
