"""The study: its storage (a SQLite file, or a PostgreSQL server many workers share), the
search space it was made with, the lock that hands out trials, and each running trial's heartbeat.

A worker that dies (kill -9, a lost node, a preempted job) leaves its trial RUNNING. Optuna's
heartbeat marks such a trial failed once it has been silent for ``grace_period`` seconds, and
``RetryHeartbeatStaleTrialCallback`` queues a copy with the same params, which the next worker
to ask takes (optuna.storages.fail_stale_trials, called before every trial).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.trial import TrialState

from ..train.trial_report import PRUNER_ATTR, build_pruner
from .config import SearchConfig, SearchError

SPACE_ATTR = "imgclf_search_space"  # the study's user attribute: SearchConfig.saved_space()


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def resolve_url(url: str, root: Path) -> str:
    """An absolute URL for SQLAlchemy: a relative SQLite path is taken from the project root
    (trials run in DVC's temporary folders); plain postgresql:// uses psycopg 3."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str((root / url.removeprefix("sqlite:///")).resolve())
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, config: SearchConfig) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise SearchError(f"storage {url}: the folder {folder} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            # Workers starting together would each create the tables of a new database: one at a time.
            with study_lock(url, "storage"):
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=config.heartbeat_interval,
                    grace_period=config.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's and the driver's errors vary; the cause is one line
            cause = str(getattr(e, "orig", None) or e).strip().splitlines()
            raise SearchError(f"storage {redact(url)} does not answer: {cause[0] if cause else type(e).__name__}") from None


def make_sampler(config: SearchConfig, seed: int | None):
    kind = config.sampler if config.sampler != "auto" else ("tpe" if len(config.objectives) == 1 else "nsga2")
    if kind == "nsga2":
        # Optuna's default population (50) would keep a short search in its random first generation.
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, config.trials // 3)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, config.trials // 3)))


def open_study(storage: optuna.storages.RDBStorage, config: SearchConfig, seed: int | None) -> optuna.Study:
    """The study named in the config, made if new; refused if it was made with another space.

    The sampler's seed is offset by the trials the study already holds, so a restarted worker
    does not draw its first trials' params again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=config.study, storage=storage, directions=config.directions,
                                    pruner=build_pruner(config.pruner.model_dump()), load_if_exists=True)
    except ValueError as e:  # directions differ from the saved study's
        raise SearchError(f"study {config.study!r}: {e}") from None
    saved = study.user_attrs.get(SPACE_ATTR)
    if saved is None:
        study.set_user_attr(SPACE_ATTR, config.saved_space())
    elif saved != config.saved_space():
        raise SearchError(f"study {config.study!r} in {redact(storage.url)} was made with another search space: "
                          f"{space_difference(saved, config.saved_space())}; name a new study (--study) or "
                          "restore the file's space")
    study.set_user_attr(PRUNER_ATTR, config.pruner.model_dump(exclude_none=True))
    if seed is not None:
        seed += 1000 * len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(config, seed)
    return study


def space_difference(saved: str, wanted: str) -> str:
    import json

    a, b = json.loads(saved), json.loads(wanted)
    for part in ("objectives", "fixed", "space"):
        if a[part] != b[part]:
            if part == "objectives":
                return f"objectives saved {a[part]}, the file has {b[part]}"
            keys = sorted(set(a[part]) | set(b[part]))
            key = next(k for k in keys if a[part].get(k) != b[part].get(k))
            return f"{part} {key}: saved {a[part].get(key, 'absent')}, the file has {b[part].get(key, 'absent')}"
    return "they differ"


@contextlib.contextmanager
def study_lock(url: str, name: str) -> Iterator[None]:
    """One worker at a time (per ``name``): a SQLite file is locked with flock beside it,
    PostgreSQL with an advisory lock. Other databases: no lock (then, when workers start at the
    same moment, the trial count may overshoot by up to the number of workers less one)."""
    if url.startswith("sqlite:///"):
        with open(url.removeprefix("sqlite:///") + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"imgclf-search:{name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


def next_trial(study: optuna.Study, config: SearchConfig, url: str, distributions) -> optuna.Trial | None:
    """The next trial to run, or None when the study holds ``config.trials`` live or finished
    ones. A trial queued again (a dead worker's, an interrupted one) is always taken."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna warns that heartbeats are meant for Study.optimize: this loop does optimize's part
        # (fail_stale_trials before each trial, a Heartbeat while it runs) around a subprocess.
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        optuna.storages.fail_stale_trials(study)
        with study_lock(url, f"trials of {config.study}"):
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            counted = sum(t.state != TrialState.FAIL for t in trials)
            if not waiting and counted >= config.trials:
                return None
            trial = study.ask(distributions)
            # At once: a trial that never beat could never be found stale, were its worker to die now.
            study._storage.record_heartbeat(trial._trial_id)
            return trial


class Heartbeat:
    """Records the trial's heartbeat every ``heartbeat_interval`` seconds while it runs
    (``with Heartbeat(storage, trial_id):``)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(interval):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def queue_again(study: optuna.Study, trial_id: int) -> None:
    """Mark an interrupted trial failed and queue a copy with its params, as a dead worker's is."""
    storage = study._storage
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback(study, storage.get_trial(trial_id))
