"""The process-level fault suite: real processes, real `dvc` where it matters.

Each case interrupts or starves a real stage (Ctrl-C through a pseudo-terminal, `kill -9`, a
file-size limit, a full or read-only filesystem, a damaged checkpoint, a misspelt params
section, two experiments at once) and checks what a user would see: a non-zero exit, one
line naming the cause, no traceback, nothing partial at an output path, and the earlier
outputs still recoverable (resumed to bit-identical weights, or `dvc checkout`).

One trained project is built per module and copied for each case.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imgclf.core.files import file_digest
from imgclf.core.params import ModelParams, TrainParams
from imgclf.train import checkpoint

from helpers import FAST_EXPORT, FAST_TRAIN, Project, copy_of, copy_project, default_sigint, run_env

EPOCHS = 8  # long enough to interrupt after the first checkpoint, mid-run
OUTPUTS = ["models/trained.pt", "models/model.pt", "models/model_state.pt", "metrics/export.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_archive) -> Project:
    """A project after one uninterrupted `dvc repro`, committed: the reference run."""
    proj = Project(copy_project(tmp_path_factory.mktemp("faults") / "proj"))
    proj.set_params(download={"url": str(cifar_archive), "md5": file_digest(cifar_archive)},
                    train=FAST_TRAIN | {"epochs": EPOCHS}, export=FAST_EXPORT)
    proj.git("init", "-q", "-b", "main")
    proj.reproduce_and_commit()
    return proj


def clone(base: Project, tmp_path: Path) -> Project:
    """A copy of the trained project (workspace, git, DVC cache) to break."""
    return copy_of(base.path, tmp_path / "proj")


def weights(proj: Project) -> dict[str, torch.Tensor]:
    return torch.load(proj.path / "models/trained.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: Project, b: Project) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run's"


def leftovers(proj: Project) -> list[str]:
    """Temporaries of atomic_path anywhere in the project (a partial write left behind)."""
    return sorted(str(p.relative_to(proj.path)) for p in proj.path.rglob("*.tmp-*") if ".dvc" not in p.parts)


def stage_errors(out: str, stage: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"error ({stage}):")]


def descendants(pid: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def stage_process(dvc_pid: int, script: str) -> int:
    """The pid of the stage's own python (`python stages/<name>.py`) under a dvc process."""
    for pid in descendants(dvc_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if argv[1:] == [script.encode()] and b"python" in Path(argv[0].decode()).name.encode():
            return pid
    raise AssertionError(f"no process runs {script}")


def wait_for(condition, proc_alive, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc_alive(), "the run ended before the fault could be injected"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def ctrl_c_in_a_terminal(proj: Project, *dvc_args: str, when) -> tuple[int, str]:
    """Run dvc with a pseudo-terminal as its controlling terminal and type Ctrl-C into it as
    soon as ``when()``; return the exit status and what the terminal showed."""
    pid, fd = pty.fork()  # the child: a new session, the pty its terminal, in the foreground
    if pid == 0:
        try:
            os.chdir(proj.path)
            default_sigint()
            os.execve(sys.executable, [sys.executable, "-m", "dvc", *dvc_args], run_env())
        finally:
            os._exit(127)
    out, sent, deadline = b"", False, time.time() + 180
    while time.time() < deadline:
        if not sent and when():
            os.write(fd, b"\x03")  # the terminal's Ctrl-C: SIGINT to its foreground process group
            sent = True
        if select.select([fd], [], [], 0.01)[0]:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:  # EIO: the child side closed
                break
            if not chunk:
                break
            out += chunk
    else:
        os.kill(pid, signal.SIGKILL)
    os.close(fd)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert sent, "the run ended before Ctrl-C"
    return status, out.decode(errors="replace")


def epochs_done(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["epoch"] + 1


def test_ctrl_c_in_a_terminal_then_kill_9_each_resume_to_bit_identical_weights(trained, tmp_path):
    """Two interruptions of one training run, each resumed by the next `dvc repro`: Ctrl-C
    typed into a real pseudo-terminal mid-run, then `kill -9` of the training process (the
    stage's python, not dvc). The final weights equal the uninterrupted run's, bit for bit."""
    proj = clone(trained, tmp_path)
    ckpt = proj.path / "checkpoints/train.pt"
    status, text = ctrl_c_in_a_terminal(proj, "repro", "--force", "--single-item", "train",
                                        when=ckpt.exists)  # epoch 1 is saved: epoch 2 is under way
    assert status != 0 and "train: interrupted" in text and "failed to reproduce 'train'" in text, text[-2000:]
    assert "Traceback" not in text
    first = epochs_done(ckpt)
    assert 1 <= first < EPOCHS
    assert not (proj.path / "models/trained.pt").exists() and leftovers(proj) == []

    saved = ckpt.stat().st_mtime_ns
    log = open(tmp_path / "repro.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=proj.path, env=run_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ckpt.stat().st_mtime_ns != saved, lambda: proc.poll() is None)  # a later epoch saved
        os.kill(stage_process(proc.pid, "stages/train.py"), signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    out = log.read()
    assert f"resuming from checkpoints/train.pt: epoch {first} of {EPOCHS} done" in out
    assert "failed to reproduce 'train'" in out and "Traceback" not in out
    assert not (proj.path / "models/trained.pt").exists()
    second = epochs_done(ckpt)  # whole: it was renamed into place, never written in place
    assert first < second < EPOCHS

    resumed = proj.dvc("repro")
    assert f"resuming from checkpoints/train.pt: epoch {second} of {EPOCHS} done" in resumed.stdout + resumed.stderr
    assert_same_weights(proj, trained)
    assert not ckpt.exists()


def test_a_truncated_checkpoint_is_set_aside_and_dvc_repro_trains_fresh(trained, tmp_path):
    proj = clone(trained, tmp_path)
    ckpt = proj.path / "checkpoints/train.pt"
    ckpt.parent.mkdir(exist_ok=True)  # the reference run left it, empty
    checkpoint.save(ckpt, fingerprint="x", epoch=3, history=[], model=torch.nn.Linear(64, 64), step_state={},
                    model_params=ModelParams(), train_params=TrainParams())
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a power cut: the data never landed
    proc = proj.dvc("repro", "--force", "--single-item", "train")
    out = proc.stdout + proc.stderr
    assert "checkpoints/train.pt does not load" in out and "training starts fresh" in out
    assert "resuming" not in out and "Traceback" not in out
    assert [p.name.startswith("train.pt.damaged-") for p in ckpt.parent.iterdir()] == [True]
    assert_same_weights(proj, trained)


def python_shim(tmp_path: Path, max_file_bytes: int) -> dict[str, str]:
    """An environment whose `python` (what the stages' commands call; dvc itself runs as
    sys.executable) may not write a file over ``max_file_bytes``: `ulimit -f`."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").write_text(
        "#!/bin/sh\n"
        f"exec {sys.executable} -c 'import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, resource.RLIM_INFINITY)); "
        f"os.execv(sys.argv[1], sys.argv[1:])' {sys.executable} \"$@\"\n"
    )
    (shim / "python").chmod(0o755)
    env = run_env()
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    return env


def test_a_file_size_limit_during_export_under_dvc(trained, tmp_path):
    """EFBIG (CPython ignores SIGXFSZ, so the write fails): one line, nothing partial, and the
    previous export, which DVC deletes before running the stage, comes back."""
    proj = clone(trained, tmp_path)
    before = {rel: file_digest(proj.path / rel) for rel in OUTPUTS}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "export"],
                          cwd=proj.path, env=python_shim(tmp_path, 100_000), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert stage_errors(out, "export") == [
        "error (export): cannot write models/model.pt: File too large (EFBIG): "
        "this process may not write files over 100000 bytes (ulimit -f)"
    ], out
    assert leftovers(proj) == []
    for rel in OUTPUTS:  # absent (DVC removes a stage's outputs first) or the previous one
        path = proj.path / rel
        assert not path.exists() or file_digest(path) == before[rel], rel
    proj.dvc("checkout")  # the models, from DVC's cache
    proj.git("checkout", "--", "metrics/export.json")  # a metric (cache: false) lives in git
    assert {rel: file_digest(proj.path / rel) for rel in OUTPUTS} == before


def in_private_mounts(proj: Project, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in the project inside a private mount namespace, where it may mount
    a tiny or read-only filesystem that the root user cannot write past; skip where that is
    not allowed (not root, no unshare)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private mount namespace here: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], cwd=proj.path, env=run_env(),
                          capture_output=True, text=True, timeout=300)


LIST_MODELS = 'echo "--- models"; ls -A models; md5sum models/*.pt'


def previous_models(proj: Project) -> str:
    listing = ["--- models", *sorted(p.name for p in (proj.path / "models").iterdir())]
    return "\n".join(listing + [f"{file_digest(p)}  models/{p.name}" for p in sorted((proj.path / "models").glob("*.pt"))])


@pytest.mark.parametrize("case,mount,message", [
    # A tiny filesystem over models/, holding the previous files and 100 kB more.
    ("full", "keep=$(mktemp -d); cp -a models/. $keep; mount -t tmpfs -o size=$(($(du -sb models | cut -f1) + 100000)) "
             "tmpfs models; cp -a $keep/. models",
     "error (export): cannot write models/model.pt: No space left on device (ENOSPC)"),
    ("read-only", "mount --bind models models; mount -o remount,ro,bind models",
     "error (export): cannot write models/model.pt: Read-only file system (EROFS)"),
])
def test_export_onto_a_full_or_read_only_filesystem(trained, tmp_path, case, mount, message):
    proj = clone(trained, tmp_path)
    expected = previous_models(proj)
    proc = in_private_mounts(proj, f"{mount}\nset +e\npython stages/export.py; echo \"exit $?\"\n{LIST_MODELS}")
    out = proc.stdout + proc.stderr
    errors = stage_errors(out, "export")
    assert len(errors) == 1 and errors[0].startswith(message), out
    assert "exit 1" in proc.stdout and "Traceback" not in out
    # Inside the namespace, after the failure: the previous files, intact, and no temporary.
    assert proc.stdout.split("exit 1\n", 1)[1].strip() == expected


@pytest.mark.parametrize("case", ["file-not-folder", "permission"])
def test_an_output_folder_that_refuses_writes(trained, tmp_path, case):
    """`metrics` a file (ENOTDIR: root cannot bypass it), or a folder without write
    permission (EACCES: root bypasses it, so only checked as another user)."""
    proj = clone(trained, tmp_path)
    metrics = proj.path / "metrics"
    if case == "file-not-folder":
        shutil.rmtree(metrics)
        metrics.write_text("not a folder\n")
        message = "error (evaluate): cannot write metrics/eval.json: metrics is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder anyway: see the read-only mount case")
        metrics.chmod(0o555)
        message = "error (evaluate): cannot write metrics/eval.json: Permission denied (EACCES)"
    proc = proj.run(sys.executable, "stages/evaluate.py", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert stage_errors(proc.stderr, "evaluate") == [message], proc.stderr
    assert leftovers(proj) == []


def test_a_misspelt_section_fails_the_next_repro_and_reruns_nothing_else(trained, tmp_path):
    proj = clone(trained, tmp_path)
    good = (proj.path / "params.yaml").read_text()
    (proj.path / "params.yaml").write_text(good + "trian:\n  lr: 0.1\n")
    proc = proj.dvc("repro", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and proj.ran_stages(proc) == ["params"] and "Traceback" not in out
    assert "unknown section 'trian' (value {'lr': 0.1}); the keys of the top level are: download," in out
    (proj.path / "params.yaml").write_text(good)
    assert proj.ran_stages(proj.dvc("repro")) == []


def stop_queue_workers(proj: Project) -> None:
    """`dvc queue start` leaves daemon workers behind (`dvc queue stop` waits for them); end
    those of this project, and only those, once the queue is done."""
    mine = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dvc" in argv and (cwd == str(proj.path) or cwd.startswith(f"{proj.path}/")):
            mine.append(int(entry))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 3
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in mine):
            time.sleep(0.1)


def test_two_queued_experiments_run_at_once_and_both_show_their_metrics(trained, tmp_path):
    proj = clone(trained, tmp_path)
    # Test-time augmentation: each experiment reruns params, export and evaluate only, so the
    # case stays short.
    for setting in ("export.tta_flip=true", "export.tta_shift=1"):
        proj.dvc("exp", "run", "--queue", "-S", setting)
    try:
        started = proj.dvc("queue", "start", "-j", "2")
        assert "Started '2' new experiments task queue workers" in started.stdout + started.stderr
        # A finished experiment is a git ref: cheap to poll, unlike `dvc queue status`, a dvc
        # process competing with the experiments (asked every 10 s in case one failed).
        deadline, asked = time.time() + 300, time.time()
        while len(proj.git("for-each-ref", "refs/exps").stdout.splitlines()) < 2:
            assert time.time() < deadline, "the experiments did not finish in 300 s"
            if time.time() - asked > 10:
                assert "Failed" not in proj.dvc("queue", "status").stdout
                asked = time.time()
            time.sleep(0.5)
        status = proj.dvc("queue", "status").stdout
    finally:
        stop_queue_workers(proj)
    assert status.count("Success") == 2, status
    shown = {}
    for row in json.loads(proj.dvc("exp", "show", "--json").stdout):
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                params = data["params"]["params.yaml"]["data"]["export"]
                shown[params["tta_flip"], params["tta_shift"]] = data["metrics"]["metrics/eval.json"]["data"]
    assert set(shown) == {(True, 0), (False, 1)}, shown
    for (flip, shift), metrics in shown.items():  # each row shows the metrics its own run wrote
        assert (metrics["tta_flip"], metrics["tta_shift"]) == (flip, shift)
        assert metrics["num_test"] == 50 and metrics["test_acc"] > 0.3  # the trained model: far above chance
