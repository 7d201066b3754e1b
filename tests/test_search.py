"""imgclf-search: real searches (real `dvc exp run`, real Optuna storage) on the tiny archive.

Trials stop at the train stage (`target: train`) and train one or two epochs, so a trial takes
seconds; the PostgreSQL test starts its own throwaway server on a loopback port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from helpers import Project, copy_of, copy_project, default_sigint, run_env
from postgres import throwaway_postgres

SEARCH = [str(Path(sys.executable).parent / "imgclf-search")]
# lr 1e-6 learns nothing in an epoch (val_acc 0.1, the threshold pruner stops it); 0.03 learns. (Not 0.02:
# with 2 epochs that is the committed pipeline, which DVC would not rerun.)
SPACE = {"train.lr": {"type": "categorical", "choices": [0.03, 1e-6]}}


def write_search(project: Project, **settings) -> None:
    # seed 0 draws lr 1e-6 for trial 0 (pruned) and 0.03 for trial 1 (completes)
    config = {"study": "tiny", "trials": 3, "seed": 0, "target": "train", "space": SPACE,
              "pruner": {"type": "threshold", "lower": 0.3, "warmup_epochs": 0}, "fixed": {"train.epochs": 2},
              **settings}
    (project.path / "search.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def search(project: Project, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return project.run(*SEARCH, *args, check=check)


def load_study(project: Project, name: str = "tiny", url: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url or f"sqlite:///{project.path / 'search.db'}")


def experiment_names(project: Project) -> set[str]:
    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    return {e["name"] for row in shown for e in (row.get("experiments") or []) if e.get("name")}


def committed_json(project: Project, name: str, path: str) -> dict:
    ref = next(r for r in project.git("for-each-ref", "--format=%(refname)", "refs/exps/").stdout.split()
               if r.endswith("/" + name))
    return json.loads(project.git("show", f"{ref}:{path}").stdout)


def test_search_trials_are_experiments_pruned_ones_stop_early_and_a_restart_continues(reproduced):
    """Ctrl-C in the middle of trial 1; the restarted search runs trial 1's params again and
    finishes the study's 3 trials. Every trial is an experiment; the pruned one trained 1 of 2 epochs."""
    project = reproduced
    write_search(project)
    proc = subprocess.Popen(SEARCH, cwd=project.path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=default_sigint)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("trial 1:"):
            time.sleep(1.5)  # DVC is under way
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the search, DVC and the stage
            break
    out.append(proc.stdout.read())
    assert proc.wait(timeout=120) == 130, "".join(out)
    assert "trial 1 is marked failed and queued again" in "".join(out)
    interrupted = load_study(project).trials[1]
    assert interrupted.state == TrialState.FAIL

    again = search(project)
    assert "study 'tiny': 3 trials so far, 3 wanted" in again.stdout
    assert "trial 2 (again, for trial 1): train.lr=" in again.stdout
    study = load_study(project)
    states = [t.state for t in study.trials]
    assert states[1] == TrialState.FAIL and len(states) == 4
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 3
    assert study.trials[2].params == interrupted.params

    finished = [t for t in study.trials if t.state != TrialState.FAIL]
    names = {t.user_attrs["experiment"] for t in finished}
    assert names == {f"tiny-{t.number}" for t in finished}
    assert names <= experiment_names(project)  # every trial is in dvc exp show
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert pruned and complete, [(t.number, t.state, t.params) for t in finished]
    for t in pruned:
        assert t.params["train.lr"] == 1e-6 and list(t.intermediate_values) == [1]  # stopped before epoch 2
        metrics = committed_json(project, t.user_attrs["experiment"], "metrics/train.json")
        assert metrics["pruned_after_epoch"] == 1 and metrics["epochs"] == 2
    for t in complete:
        assert list(t.intermediate_values) == [1, 2]
        metrics = committed_json(project, t.user_attrs["experiment"], "metrics/train.json")
        assert "pruned_after_epoch" not in metrics and t.values == [metrics["val_acc"]]
    best = max(complete, key=lambda t: t.values[0])
    assert f"trial {best.number} (val_acc {best.values[0]:.4g}): dvc exp apply tiny-{best.number}" in again.stdout
    assert "reproduce: dvc exp run -S train.epochs=2 -S train.lr=0.03" in again.stdout
    png = project.path / "search/tiny/optimisation_history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The workspace is as it was: trials ran in DVC's temporary folders.
    assert project.git("status", "--porcelain", "--untracked-files=no").stdout == ""

    # Nothing left to do: a third start runs no trial, and says so with the same table.
    third = search(project)
    assert "study 'tiny': 4 trials so far" in third.stdout
    assert not re.search(r"^trial \d+", third.stdout, re.M) and "best trial:" in third.stdout


@pytest.fixture
def plain_project(tmp_path) -> Project:
    """The project's files only: every refusal below comes before any trial or data."""
    proj = Project(copy_project(tmp_path / "proj"))
    write_search(proj)
    return proj


@pytest.mark.parametrize("change, message", [
    ({"space": {"train.lrr": {"type": "float", "low": 0.1, "high": 0.2}}},
     "search.yaml: space: unknown key 'train.lrr' (value 0.1); the keys of train are: epochs,"),
    ({"space": {"train.momentum": {"type": "float", "low": 0.5, "high": 1.5}}},
     "search.yaml: space: train.momentum = 1.5: Input should be less than 1"),
    ({"space": {"train.lr": {"type": "log_float", "low": 0, "high": 0.1}}},
     "error (search): search.yaml: space.train.lr: log_float needs low > 0 (got 0.0)\n"),
    ({"fixed": {"train.epochs": True}}, "search.yaml: fixed: train.epochs = True: must be a whole number"),
    ({"objective": ["val_acc", "train_pflop"]}, "Optuna prunes only single-objective studies"),
    ({"storage": "postgresql://search:secret@127.0.0.1:9/db"},
     "error (search): storage postgresql+psycopg://search:***@127.0.0.1:9/db does not answer: "),
])
def test_bad_input_is_one_line_and_runs_no_trial(plain_project, change, message):
    write_search(plain_project, **change)
    proc = search(plain_project, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "secret" not in proc.stderr
    assert not (plain_project.path / "search").exists()


def test_a_study_made_with_another_space_is_refused(plain_project):
    search(plain_project, "--report")  # makes the study with the file's space, runs nothing
    write_search(plain_project, space={"train.lr": {"type": "log_float", "low": 0.001, "high": 0.1}})
    proc = search(plain_project, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error (search): study 'tiny' in sqlite:///" + str(plain_project.path / "search.db")
                           + " was made with another search space: space train.lr: saved {'choices': [0.03, 1e-06], "
                           "'type': 'categorical'}, the file has {'high': 0.1, 'low': 0.001, 'type': 'log_float'}; "
                           "name a new study (--study) or restore the file's space\n")
    assert len(load_study(plain_project).trials) == 0


def test_a_dead_workers_trial_is_failed_and_queued_again(tmp_path):
    """A RUNNING trial whose heartbeat stops (its worker was killed) is marked failed once the
    grace period passes, and the next worker to ask runs its params again."""
    from imgclf.search.config import SearchConfig
    from imgclf.search.study import next_trial, open_storage, open_study
    from imgclf.search.trials import distributions

    config = SearchConfig(study="s", trials=2, heartbeat_interval=1, grace_period=2,
                          space={"train.lr": {"type": "log_float", "low": 1e-3, "high": 1.0}})
    url = f"sqlite:///{tmp_path / 'search.db'}"
    study = open_study(open_storage(url, config), config, seed=0)
    dead = next_trial(study, config, url, distributions(config))  # its worker never beats again
    time.sleep(3.5)  # SQLite keeps the heartbeat to the second: more than 2 s must show
    other = open_study(open_storage(url, config), config, seed=1)
    retry = next_trial(other, config, url, distributions(config))
    trials = other.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert retry.number == dead.number + 1 and retry.params == dead.params
    assert trials[retry.number].system_attrs["failed_trial"] == dead.number


def test_two_workers_in_two_clones_share_one_postgresql_study(reproduced_template, tmp_path):
    """Both workers at once against one PostgreSQL study: 3 trials in all, each run by one worker
    once, and every experiment gathered in the git remote both clones push to."""
    with throwaway_postgres(tmp_path) as url:
        template = copy_of(reproduced_template, tmp_path / "template")
        remote = tmp_path / "remote.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(template.path), str(remote)], check=True)
        store = tmp_path / "dvc-store"  # a DVC remote: the template's cache, as `dvc push` would lay it out
        subprocess.run(["cp", "-r", str(template.path / ".dvc/cache"), str(store)], check=True)
        workers = []
        for i in (1, 2):
            subprocess.run(["git", "clone", "-q", str(remote), str(tmp_path / f"w{i}")], check=True)
            w = Project(tmp_path / f"w{i}")
            w.dvc("remote", "add", "--local", "-d", "store", str(store))
            w.dvc("pull", "-q")
            write_search(w, storage=url, study="shared", pruner={"type": "none"}, fixed={"train.epochs": 1})
            workers.append(w)
        procs = [subprocess.Popen([*SEARCH, "--seed", str(i)], cwd=w.path, env=run_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i, w in enumerate(workers)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        study = optuna.load_study(study_name="shared", storage=url.replace("postgresql://", "postgresql+psycopg://"))
        trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both took part
    ran = {f"shared-{t.number}": [w for w in (1, 2) if f"trial {t.number}:" in outs[w - 1]] for t in trials}
    assert all(len(by) == 1 for by in ran.values()), ran  # no trial ran twice
    print(f"two workers, one study: trial -> worker {ran}")  # shown with pytest -s
    pushed = subprocess.run(["git", "ls-remote", str(remote), "refs/exps/*"], capture_output=True, text=True).stdout
    assert {line.rsplit("/", 1)[1] for line in pushed.splitlines()} == set(ran)
