"""search.yaml: the search space by dotted params key, the objective(s), the sampler and pruner,
the study and its storage; checked against the params schema before any trial runs.

Every bound of a range and every choice is put into a copy of ``params.yaml`` and validated by
the same schema every stage uses (imgclf/core/params.py), so a key that is not a param or a
value the schema refuses is one line naming it, before a trial starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.errors import PipelineError
from ..core.params import ParamsError, parse_params, read_yaml

# The metrics a trial can be judged by (metrics/train.json) and which way is better.
DIRECTIONS = {"val_acc": "maximize", "train_pflop": "minimize", "train_seconds": "minimize", "val_loss": "minimize"}
DEFAULT_STORAGE = "sqlite:///search.db"  # beside params.yaml; git-ignored


class SearchError(PipelineError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class FloatRange(_Strict):
    type: Literal["float", "log_float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0)  # float only: a grid low, low + step, ...

    @model_validator(mode="after")
    def _order(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "log_float" and self.low <= 0:
            raise ValueError(f"log_float needs low > 0 (got {self.low})")
        if self.type == "log_float" and self.step is not None:
            raise ValueError("log_float takes no step")
        return self


class IntRange(_Strict):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log needs low >= 1 and step 1")
        return self


class Choices(_Strict):
    type: Literal["categorical"]
    choices: list[bool | int | float | str] = Field(min_length=1)


class Pruner(_Strict):
    type: Literal["median", "hyperband", "threshold", "none"] = "median"
    startup_trials: int = Field(3, ge=0)  # median: trials finished before any is pruned
    warmup_epochs: int = Field(1, ge=0)  # median, threshold: epochs a trial runs before it can be pruned
    min_epochs: int = Field(1, ge=1)  # hyperband: the fewest epochs a trial runs
    reduction_factor: int = Field(3, ge=2)  # hyperband
    lower: float | None = None  # threshold: prune below this val_acc

    @model_validator(mode="after")
    def _threshold(self) -> Pruner:
        if self.type == "threshold" and self.lower is None:
            raise ValueError("the threshold pruner needs lower (the val_acc below which a trial stops)")
        return self


class SearchConfig(_Strict):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also the experiments' name prefix
    storage: str = DEFAULT_STORAGE
    trials: int = Field(ge=1, le=100_000)  # finished trials (complete or pruned) the study should hold
    objective: str | list[str] = "val_acc"
    sampler: Literal["tpe", "nsga2", "random", "auto"] = "auto"  # auto: tpe for one objective, nsga2 for two
    seed: int | None = None  # the sampler's
    pruner: Pruner = Pruner()
    # What each trial reproduces: '' the whole pipeline; a stage name (train) stops there.
    target: str = ""
    push: bool = True  # dvc exp push each trial's experiment where the clone has a git remote
    heartbeat_interval: int = Field(30, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(120, ge=2)  # seconds without a heartbeat before a trial counts as dead
    space: dict[str, FloatRange | IntRange | Choices] = Field(min_length=1)
    fixed: dict[str, bool | int | float | str] = {}  # -S values every trial gets

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not 1 <= len(names) <= 2 or len(set(names)) != len(names):
            raise ValueError("must be one metric or a list of two different ones")
        for n in names:
            if n not in DIRECTIONS:
                raise ValueError(f"unknown metric {n!r}; one of: {', '.join(DIRECTIONS)}")
        return v

    @property
    def objectives(self) -> list[str]:
        return [self.objective] if isinstance(self.objective, str) else list(self.objective)

    @property
    def directions(self) -> list[str]:
        return [DIRECTIONS[n] for n in self.objectives]

    def saved_space(self) -> str:
        """What a study is tied to (JSON): restarting with other ranges, keys, objectives or fixed
        values would mix trials measured differently."""
        return json.dumps({"space": {k: v.model_dump(exclude_none=True) for k, v in sorted(self.space.items())},
                           "objectives": self.objectives, "fixed": dict(sorted(self.fixed.items()))},
                          sort_keys=True)


def _describe(e: ValidationError, where: str) -> str:
    """The first problem as ``where.key = value: what is wrong`` (``where: ...`` for the whole entry)."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("FloatRange", "IntRange", "Choices")))
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    if not key:
        return f"{where}: {msg}{more}"
    return f"{where}{'.' if where else ''}{key} = {err.get('input')!r}: {msg}{more}"


def load_config(path: Path, params_path: Path, **overrides: Any) -> SearchConfig:
    """search.yaml, with command-line ``overrides`` (None = keep the file's), checked against the
    params schema with ``params_path``'s values as the base."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SearchError(f"{path}: expected a mapping (study, trials, space, ...), got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    # A search space whose ranges differ from the union members' fields: name the member's problem.
    space = raw.get("space")
    if isinstance(space, dict):
        for key, dist in space.items():
            kind = dist.get("type") if isinstance(dist, dict) else None
            model = {"float": FloatRange, "log_float": FloatRange, "int": IntRange, "categorical": Choices}.get(kind)
            if model is None:
                raise SearchError(f"{path}: space.{key}.type = {kind!r}: one of float, log_float, int, categorical")
            try:
                model.model_validate(dist)
            except ValidationError as e:
                raise SearchError(f"{path}: {_describe(e, f'space.{key}')}") from None
    try:
        config = SearchConfig.model_validate(raw)
    except ValidationError as e:
        raise SearchError(f"{path}: {_describe(e, '')}") from None
    check_against_params(config, read_yaml(params_path), path)
    return config


def _set(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:  # a missing or non-mapping level becomes a mapping: the schema then names the key
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return out


def check_against_params(config: SearchConfig, params: Any, source: Path) -> None:
    """Every fixed value, every bound and every choice must make valid params."""
    base = dict(params or {})
    for key, value in config.fixed.items():
        base = _set(base, key, value)
    _validate(base, f"{source}: fixed")
    if any(n.startswith("val_") for n in config.objectives + ["val_acc"] * (config.pruner.type != "none")):
        if parse_params(base).train.val_fraction == 0:
            raise SearchError(f"{source}: judging trials by val_acc needs train.val_fraction > 0 (it is 0)")
    if len(config.objectives) > 1 and config.pruner.type != "none":
        raise SearchError(f"{source}: pruner.type = {config.pruner.type!r}: Optuna prunes only single-objective "
                          "studies; set pruner: {type: none} for two objectives")
    for key, dist in config.space.items():
        if key in config.fixed:
            raise SearchError(f"{source}: {key} is both searched (space) and fixed")
        values = dist.choices if isinstance(dist, Choices) else [dist.low, dist.high]
        for value in values:
            _validate(_set(base, key, value), f"{source}: space")


def _validate(raw: dict[str, Any], where: str) -> None:
    try:
        parse_params(raw, where)
    except ParamsError as e:
        raise SearchError(str(e).splitlines()[0]) from None
