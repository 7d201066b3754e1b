"""One trial: its params as `dvc exp run --temp -n <study>-<number> -S key=value ...`, the train
stage told of its trial by environment variables, the result read from the experiment's commit.

``--temp`` runs each trial in a folder of DVC's own (.dvc/tmp/exps), so the workspace and its
params.yaml stay as they were and an interrupted trial leaves nothing behind in them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ..train.trial_report import ENV_STORAGE, ENV_STUDY, ENV_TRIAL
from .config import Choices, FloatRange, SearchConfig

METRICS_FILE = "metrics/train.json"  # the train stage's metrics: what trials are judged by


def distributions(config: SearchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, d in config.space.items():
        if isinstance(d, Choices):
            out[key] = CategoricalDistribution(d.choices)
        elif isinstance(d, FloatRange):
            out[key] = FloatDistribution(d.low, d.high, log=d.type == "log_float", step=d.step)
        else:
            out[key] = IntDistribution(d.low, d.high, log=d.log, step=d.step)
    return out


def set_value(value: Any) -> str:
    """A value as `-S key=value` needs it: DVC reads it as YAML, so a string that YAML would read
    as something else (true, 1e-3, '') is quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    from ruamel.yaml import YAML

    try:
        plain = YAML(typ="safe").load(value) == value
    except Exception:  # noqa: BLE001 - not YAML on its own: quote it
        plain = False
    return value if plain and value else json.dumps(value)


def set_args(params: dict[str, Any]) -> list[str]:
    return [a for k, v in params.items() for a in ("-S", f"{k}={set_value(v)}")]


def reproduce_command(config: SearchConfig, params: dict[str, Any]) -> str:
    import shlex

    sets = {**config.fixed, **params}
    return " ".join(["dvc exp run", *(shlex.quote(a) for a in set_args(sets))])


def experiment_name(config: SearchConfig, number: int) -> str:
    return f"{config.study}-{number}"


@dataclass
class Outcome:
    state: optuna.trial.TrialState
    values: list[float] | None
    metrics: dict[str, Any]
    seconds: float
    error: str = ""  # the failed run's one line


def run_trial(trial: optuna.Trial, config: SearchConfig, url: str, root: Path, log_file: Path,
              verbose: bool = False) -> Outcome:
    """Run the trial's experiment; its outcome (complete, pruned by the train stage, or failed)."""
    name = experiment_name(config, trial.number)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name,
           *set_args({**config.fixed, **trial.params}), *([config.target] if config.target else [])]
    env = {**os.environ, ENV_STORAGE: url, ENV_STUDY: config.study, ENV_TRIAL: str(trial.number),
           "DVC_NO_ANALYTICS": "1"}
    # Stage commands call `python`: the interpreter this runs in, with dvc and imgclf.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    start = time.monotonic()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                if verbose:
                    print(f"  [{name}] {line}", end="", flush=True)
            proc.wait()
        except KeyboardInterrupt:
            stop(proc)
            raise
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        return Outcome(optuna.trial.TrialState.FAIL, None, {}, seconds, error_line(lines, log_file))
    metrics = experiment_metrics(root, name)
    if metrics is None:
        return Outcome(optuna.trial.TrialState.FAIL, None, {}, seconds,
                       f"dvc exp run ended without an experiment named {name} (see {log_file})")
    if "pruned_after_epoch" in metrics:
        return Outcome(optuna.trial.TrialState.PRUNED, None, metrics, seconds)
    missing = [m for m in config.objectives if m not in metrics]
    if missing:
        return Outcome(optuna.trial.TrialState.FAIL, None, metrics, seconds,
                       f"{METRICS_FILE} of {name} has no {', '.join(missing)}")
    return Outcome(optuna.trial.TrialState.COMPLETE, [float(metrics[m]) for m in config.objectives], metrics, seconds)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C reached this process (and, from a terminal, DVC too): make sure DVC stops, and wait."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def error_line(lines: list[str], log_file: Path) -> str:
    """The run's own one line: the stage's `error (<stage>): ...`, else DVC's `ERROR: ...`."""
    for prefix in ("error (", "ERROR:"):
        found = [ln for ln in lines if ln.startswith(prefix)]
        if found:
            return f"{found[-1]} (whole output: {log_file})"
    tail = [ln for ln in lines if ln.strip()]
    return f"{tail[-1] if tail else 'no output'} (whole output: {log_file})"


def experiment_metrics(root: Path, name: str) -> dict[str, Any] | None:
    """metrics/train.json as the experiment named ``name`` committed it (refs/exps/.../<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=root,
                          capture_output=True, text=True).stdout.split()
    ref = next((r for r in refs if r.endswith("/" + name)), None)
    if ref is None:
        return None
    shown = subprocess.run(["git", "show", f"{ref}:{METRICS_FILE}"], cwd=root, capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def push(root: Path, name: str) -> str | None:
    """`dvc exp push` the experiment to the clone's git remote (origin, else the first); with the
    DVC cache where a default DVC remote is set. None, or the one line of a failure."""
    remotes = subprocess.run(["git", "remote"], cwd=root, capture_output=True, text=True).stdout.split()
    if not remotes:
        return None
    remote = "origin" if "origin" in remotes else remotes[0]
    dvc_remote = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
    cmd = [sys.executable, "-m", "dvc", "exp", "push", *([] if dvc_remote else ["--no-cache"]), remote, name]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        return f"dvc exp push {remote} {name} failed: {lines[-1] if lines else proc.returncode}"
    return None
