"""What a search shows at the end: the table of trials, the best trials (the Pareto front for two
objectives) with the command that reproduces each, and the pictures (matplotlib PNGs)."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..core.files import write_file
from .config import SearchConfig
from .trials import reproduce_command


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(study: optuna.Study, config: SearchConfig) -> str:
    """One row per trial: number, experiment, state, epochs run, objective value(s), params."""
    trials = study.get_trials(deepcopy=False)
    keys = list(config.space)
    head = ["trial", "experiment", "state", "epochs", *config.objectives, *keys]
    rows = []
    for t in trials:
        values = t.values if t.values is not None else [None] * len(config.objectives)
        if t.state == TrialState.PRUNED and t.intermediate_values:  # its last reported val_acc
            values = [t.intermediate_values[t.last_step]] + [None] * (len(config.objectives) - 1)
        rows.append([str(t.number), t.user_attrs.get("experiment", "-"), t.state.name.lower(),
                     _fmt(t.user_attrs.get("epochs", "-")), *("-" if v is None else f"{v:.4g}" for v in values),
                     *(_fmt(t.params[k]) if k in t.params else "-" for k in keys)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[1])


def best_summary(study: optuna.Study, config: SearchConfig) -> str:
    best = best_trials(study)
    if not best:
        return "no trial has completed yet"
    title = ("best trial" if len(best) == 1 and len(study.directions) == 1 else
             f"the Pareto front ({len(best)} trials: {config.objectives[0]} up, {config.objectives[1]} down)")
    out = [f"{title}:"]
    for t in best:
        values = ", ".join(f"{m} {v:.4g}" for m, v in zip(config.objectives, t.values))
        name = t.user_attrs.get("experiment", f"{config.study}-{t.number}")
        out += [f"  trial {t.number} ({values}): dvc exp apply {name}",
                f"    reproduce: {reproduce_command(config, t.params)}"]
    return "\n".join(out)


def draw(study: optuna.Study, config: SearchConfig, folder: Path) -> list[Path]:
    """optimisation_history.png (the first objective per trial, and the best so far) and, for two
    objectives, pareto_front.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    metric, maximise = config.objectives[0], config.directions[0] == "maximize"
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([t.number for t in done], [t.values[0] for t in done], label="complete", color="tab:blue", zorder=3)
    ax.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned], marker="x",
               color="tab:gray", label="pruned (at its last epoch)", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        if best is None or (t.values[0] > best if maximise else t.values[0] < best):
            best = t.values[0]
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"{config.study}: {metric} per trial ({len(trials)} trials)")
    ax.legend()
    paths = [_save(fig, folder / "optimisation_history.png")]
    plt.close(fig)
    if len(config.objectives) == 2:
        front = {t.number for t in best_trials(study)}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        others = [t for t in done if t.number not in front]
        on = sorted((t for t in done if t.number in front), key=lambda t: t.values[1])
        ax.scatter([t.values[1] for t in others], [t.values[0] for t in others], color="tab:gray", label="dominated")
        ax.plot([t.values[1] for t in on], [t.values[0] for t in on], "o-", color="tab:red", label="Pareto front")
        for t in on:
            ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel=config.objectives[1], ylabel=config.objectives[0],
               title=f"{config.study}: {config.objectives[0]} against {config.objectives[1]}")
        ax.legend()
        paths.append(_save(fig, folder / "pareto_front.png"))
        plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    return path
