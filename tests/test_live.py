"""DVCLive: a running experiment's latest metrics and epoch show in `dvc exp show`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from helpers import run_env

EPOCHS = 5000  # far more than the test waits for: the run is stopped once it has been seen


def running_experiments(rows: list[dict]) -> dict[str, dict]:
    """name -> latest DVCLive metrics of each experiment `dvc exp show` reports as running."""
    found = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") != "running":
                continue
            for rev in exp["revs"]:
                live = ((rev.get("data") or {}).get("metrics") or {}).get("metrics/live/metrics.json") or {}
                if "data" in live:
                    found[rev["name"]] = live["data"]
    return found


def test_a_running_experiment_shows_its_latest_metrics_and_step(project):
    project.set_params(train={"epochs": EPOCHS})
    project.git("commit", "-qam", "a long run")
    live_file = project.path / "metrics/live/metrics.json"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "-n", "watched"], cwd=project.path,
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        seen = {}
        while "watched" not in seen and proc.poll() is None and time.time() < deadline:
            if not live_file.exists():  # training has not finished its first epoch yet
                time.sleep(0.2)
                continue
            shown = project.dvc("exp", "show", "--json")
            seen = running_experiments(json.loads(shown.stdout))
        still_running = proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert "watched" in seen, f"never shown as running with metrics; dvc exp run said:\n{out[-3000:]}"
    assert still_running, "the experiment had ended when its metrics were read"
    latest = seen["watched"]
    assert 1 <= latest["step"] < EPOCHS  # the epoch it had reached, not the last one
    assert 0 <= latest["val_acc"] <= 1 and latest["train_loss"] > 0
    assert set(latest) == {"step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds", "pflop"}
    assert not (project.path / "metrics/train.json").exists()  # the final metrics come only at the end


def test_epochs_are_logged_in_a_git_repo_with_no_commit_yet(tmp_path, monkeypatch):
    """`git init`, `dvc init`, `dvc repro` before the first commit: DVCLive must not stop training."""
    from imgclf.train.epoch_log import LIVE_METRICS, EpochLog

    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=run_env(), check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # as `dvc repro` sets it for a stage
    log = EpochLog(tmp_path / "curve.csv", None, tmp_path / "live", [])
    for epoch in (1, 2):
        log.add({"epoch": epoch} | {k: 0.5 for k in LIVE_METRICS})
    log.close()
    assert json.loads((tmp_path / "live/metrics.json").read_text())["step"] == 2
    assert len((tmp_path / "curve.csv").read_text().splitlines()) == 3
