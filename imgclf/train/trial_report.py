"""Under `imgclf-search`, report each epoch's val_acc to the trial this run belongs to, and say
when the study's pruner would stop it.

The trial is named by environment variables, never by params: the experiment a trial records
is the plain `dvc exp run -S ...` anyone can rerun, and outside a search nothing here runs
(optuna is imported only when the variables are set). The search (imgclf/search/) sets them and
saves the pruner's settings in the study, so this module needs nothing of the search's code.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..core.errors import PipelineError

log = logging.getLogger(__name__)

ENV_STORAGE = "IMGCLF_SEARCH_STORAGE"  # the study's storage URL (a SQLite path is made absolute)
ENV_STUDY = "IMGCLF_SEARCH_STUDY"  # the study's name
ENV_TRIAL = "IMGCLF_SEARCH_TRIAL"  # the trial's number in the study
PRUNER_ATTR = "imgclf_pruner"  # the study's user attribute holding the pruner's settings


def build_pruner(spec: dict[str, Any]):
    """The optuna pruner for search.yaml's ``pruner:`` mapping (validated by the search)."""
    import optuna

    kind = spec.get("type", "none")
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 3),
                                           n_warmup_steps=spec.get("warmup_epochs", 1))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.get("min_epochs", 1),
                                              reduction_factor=spec.get("reduction_factor", 3))
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=spec["lower"], n_warmup_steps=spec.get("warmup_epochs", 0))
    return optuna.pruners.NopPruner()


class TrialReport:
    """One search trial's link to its study; ``epoch_done`` after each epoch says whether to stop."""

    def __init__(self, storage: str, study_name: str, number: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            probe = optuna.load_study(study_name=study_name, storage=storage)
            pruner = build_pruner(probe.user_attrs.get(PRUNER_ATTR, {}))
            study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        except Exception as e:  # noqa: BLE001 - a missing study, trial or database: one line
            raise PipelineError(f"{ENV_STUDY}={study_name} {ENV_TRIAL}={number}: cannot reach the search's trial "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.number = number
        self.trial = optuna.trial.Trial(study, trial_id)
        self.reported = set(study._storage.get_trial(trial_id).intermediate_values)
        self.single = len(study.directions) == 1  # optuna prunes single-objective studies only

    @classmethod
    def from_env(cls) -> TrialReport | None:
        names = (ENV_STORAGE, ENV_STUDY, ENV_TRIAL)
        given = [os.environ.get(n, "") for n in names]
        if not any(given):
            return None
        if not all(given) or not given[2].isdigit():
            raise PipelineError(f"a search trial needs {', '.join(names)} all set (the trial a whole number); got "
                                + ", ".join(f"{n}={v!r}" for n, v in zip(names, given)))
        return cls(given[0], given[1], int(given[2]))

    def record(self, row: dict[str, Any]) -> bool:
        """Report ``row['val_acc']`` at step ``row['epoch']`` (once: a resumed run passes its
        earlier epochs again); False where there is nothing to report."""
        epoch, value = int(row["epoch"]), row["val_acc"]
        if value is None or not self.single:  # no held-out images (train.val_fraction 0), or two objectives
            return False
        if epoch not in self.reported:
            self.trial.report(value, epoch)
            self.reported.add(epoch)
        return True

    def epoch_done(self, row: dict[str, Any]) -> bool:
        """``record`` the epoch; True when the study's pruner stops the trial here."""
        epoch, value = int(row["epoch"]), row["val_acc"]
        if self.record(row) and self.trial.should_prune():
            log.info("search trial %d: pruned after epoch %d (val_acc %.4f)", self.number, epoch, value)
            return True
        return False
