"""`imgclf-search`: run search.yaml's study, one `dvc exp run` per trial, until the study holds
its number of trials; then the table, the best trials with their commands, and the pictures.

Run it from the project root, in a git clone whose pipeline is committed. Any number of workers
(each in its own clone, on any machine) may run it against one shared storage at the same time.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from ..core.errors import PipelineError
from ..core.params import load_params
from .config import SearchConfig, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgclf-search", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=Path("search.yaml"), help="the search-space file (search.yaml)")
    p.add_argument("--storage", help="the study's storage URL, e.g. postgresql://user:password@host:5432/db "
                                     "(default: the file's, else sqlite:///search.db)")
    p.add_argument("--study", help="the study's name (default: the file's)")
    p.add_argument("--trials", type=int, help="trials the study should hold, all workers together (default: the file's)")
    p.add_argument("--seed", type=int, help="the sampler's seed; give each worker its own")
    p.add_argument("--plots", type=Path, default=Path("search"), help="folder for <study>/*.png and trial logs")
    p.add_argument("--report", action="store_true", help="run no trial: print the table, the best and draw")
    p.add_argument("-v", "--verbose", action="store_true", help="show each trial's DVC output as it runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sys.exit(search(args))
    except PipelineError as e:
        print(f"error (search): {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before or between trials: nothing to queue again
        print("search: interrupted", file=sys.stderr)
        sys.exit(130)


def search(args: argparse.Namespace) -> int:
    root = Path.cwd()
    if not (root / "params.yaml").is_file() or not (root / "dvc.yaml").is_file():
        raise PipelineError(f"{root} has no params.yaml and dvc.yaml: run imgclf-search from the project root")
    config = load_config(args.config, Path("params.yaml"), storage=args.storage, study=args.study,
                         trials=args.trials)
    load_params("params.yaml")  # the base every trial's -S values go on must itself be valid
    # optuna and SQLAlchemy take a second to import: after the file is known to be good.
    from .study import open_storage, open_study, resolve_url

    url = resolve_url(config.storage, root)
    storage = open_storage(url, config)
    seed = args.seed if args.seed is not None else config.seed
    study = open_study(storage, config, seed)
    folder = args.plots / config.study
    if not args.report:
        status = run_trials(study, storage, config, url, root, folder, args.verbose)
        if status:
            return status
    return finish(study, config, folder)


def run_trials(study, storage, config: SearchConfig, url: str, root: Path, folder: Path, verbose: bool) -> int:
    from optuna.trial import TrialState

    from .study import next_trial, queue_again
    from .trials import distributions

    space = distributions(config)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    failures_in_a_row = 0
    print(f"study {config.study!r}: {len(study.get_trials(deepcopy=False))} trials so far, "
          f"{config.trials} wanted (storage {_shown(config.storage)})", flush=True)
    while (trial := next_trial(study, config, url, space)) is not None:
        try:
            state, error = one_trial(trial, study, storage, config, url, root, folder, verbose, worker)
        except KeyboardInterrupt:
            queue_again(study, trial._trial_id)
            print(f"search: interrupted; trial {trial.number} is marked failed and queued again: run imgclf-search "
                  "again to continue the study", file=sys.stderr)
            return 130
        if state != TrialState.FAIL:
            failures_in_a_row = 0
            continue
        failures_in_a_row += 1
        if failures_in_a_row >= 3:
            print(f"error (search): 3 trials in a row failed; the last: {error}", file=sys.stderr)
            return 1
    return 0


def one_trial(trial, study, storage, config: SearchConfig, url: str, root: Path, folder: Path, verbose: bool,
              worker: str):
    """Run one trial and tell the study how it ended: (its state, the failure's line or '')."""
    from optuna.trial import TrialState

    from .study import Heartbeat
    from .trials import experiment_name, push, run_trial

    name = experiment_name(config, trial.number)
    retried = storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
    trial.set_user_attr("experiment", name)
    trial.set_user_attr("worker", worker)
    print(f"trial {trial.number}{f' (again, for trial {retried})' if retried is not None else ''}: "
          + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()),
          flush=True)
    with Heartbeat(storage, trial._trial_id):
        outcome = run_trial(trial, config, url, root, folder / "logs" / f"{name}.log", verbose)
    if outcome.metrics:
        trial.set_user_attr("epochs", int(outcome.metrics.get("pruned_after_epoch", outcome.metrics["epochs"])))
    trial.set_user_attr("seconds", round(outcome.seconds, 1))
    done = study.tell(trial, outcome.values, state=outcome.state)
    if outcome.state == TrialState.FAIL:
        print(f"  failed ({outcome.seconds:.0f} s): {outcome.error}", flush=True)
        return outcome.state, outcome.error
    if outcome.state == TrialState.PRUNED:
        print(f"  pruned after epoch {outcome.metrics['pruned_after_epoch']} of {outcome.metrics['epochs']} "
              f"(val_acc {done.intermediate_values[done.last_step]:.4f}, {outcome.seconds:.0f} s)", flush=True)
    else:
        print("  " + ", ".join(f"{m} {v:.4g}" for m, v in zip(config.objectives, outcome.values))
              + f" ({outcome.seconds:.0f} s)", flush=True)
    if config.push and (problem := push(root, name)):
        print(f"  warning: {problem}", flush=True)
    return outcome.state, ""


def finish(study, config: SearchConfig, folder: Path) -> int:
    from optuna.trial import TrialState

    from .report import best_summary, draw, trials_table

    trials = study.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    print(trials_table(study, config))
    print(best_summary(study, config))
    if running:
        print(f"still running elsewhere (or in a worker that died; such a trial is queued again once silent for "
              f"{config.grace_period} s): {', '.join(map(str, running))}")
    for path in draw(study, config, folder):
        print(f"wrote {path}")
    return 0


def _shown(url: str) -> str:
    from .study import redact

    return redact(url)


if __name__ == "__main__":
    main()
