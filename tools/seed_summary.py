"""Mean ± std over seeds of the experiments `dvc exp show` lists: the evidence a recipe needs.

    dvc exp run --queue -S 'train.seed=0,1,2,3,4' [-S ...the recipe...]   # one experiment per seed
    dvc queue start && dvc queue status                                   # wait for them
    python tools/seed_summary.py [--vary train.seed] [--json FILE]

Experiments whose params are equal except the varied key form one row: how many runs, the
test accuracy (``metrics/eval.json``), the training compute (``train_pflop``), the training
seconds and the sustained TFLOP/s (``metrics/train.json``), each as mean ± sample standard
deviation (a row of one run gives its value alone: one run has no spread). Failed and queued experiments, which have no metrics, are left out and counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from imgclf.recipes import flatten

COLUMNS = (  # (file, key, heading, format)
    ("metrics/eval.json", "test_acc", "test accuracy", "{:.2%}"),
    ("metrics/train.json", "train_pflop", "PFLOP", "{:.4g}"),
    ("metrics/train.json", "train_seconds", "training s", "{:.0f}"),
    ("metrics/train.json", "tflop_per_s", "TFLOP/s", "{:.3g}"),
)


def experiments(show: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """``(runs, skipped)``: each experiment with metrics as ``{"name", "params", "metrics"}``,
    params flattened (``train.seed``); ``skipped`` counts those without metrics."""
    runs, skipped = [], 0
    for row in show:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
                metrics = {f: (m or {}).get("data") for f, m in (data.get("metrics") or {}).items()}
                if not params or not all(metrics.get(f) for f, *_ in COLUMNS):
                    skipped += 1
                    continue
                runs.append({"name": rev.get("name") or rev.get("rev"), "params": flatten(params), "metrics": metrics})
    return runs, skipped


def summarise(runs: list[dict[str, Any]], vary: str) -> list[dict[str, Any]]:
    """One group per distinct set of params other than ``vary``: its runs' values per column."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        fixed = {k: v for k, v in run["params"].items() if k != vary}
        key = json.dumps(fixed, sort_keys=True)
        g = groups.setdefault(key, {"params": fixed, "varied": [], "names": [], "values": {c[1]: [] for c in COLUMNS}})
        g["varied"].append(run["params"].get(vary))
        g["names"].append(run["name"])
        for file, k, *_ in COLUMNS:
            g["values"][k].append(float(run["metrics"][file][k]))
    out = list(groups.values())
    common = {k for k in out[0]["params"] if all(g["params"].get(k) == out[0]["params"][k] for g in out)} if out else set()
    for g in out:  # what sets a group apart from the others
        g["differs"] = {k: v for k, v in g["params"].items() if k not in common}
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean, and the sample standard deviation: None for one run, which has no spread."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_table(groups: list[dict[str, Any]], vary: str) -> str:
    head = ["params (where the groups differ)", "runs", f"{vary} values"] + [c[2] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for g in groups:
        cells = [", ".join(f"{k}={v}" for k, v in sorted(g["differs"].items())) or "(all the same)",
                 str(len(g["names"])), ", ".join(map(str, sorted(g["varied"], key=str)))]
        for _, k, _, fmt in COLUMNS:
            m, s = mean_std(g["values"][k])
            cells.append(fmt.format(m) if s is None else f"{fmt.format(m)} ± {fmt.format(s)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vary", default="train.seed", help="the param the runs of one row differ in (default train.seed)")
    ap.add_argument("--json", metavar="FILE", help="read this `dvc exp show --json` output instead of running it")
    args = ap.parse_args(argv)
    if args.json:
        with open(args.json) as f:
            show = json.load(f)
    else:
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: `dvc exp show --json` failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
            return 2
        show = json.loads(proc.stdout)
    runs, skipped = experiments(show)
    if not runs:
        print(f"no finished experiments with metrics ({skipped} without)", file=sys.stderr)
        return 1
    print(format_table(summarise(runs, args.vary), args.vary))
    if skipped:
        print(f"\n({skipped} experiment(s) without metrics left out: queued, running or failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
