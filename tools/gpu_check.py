"""The parts of ``tools/gpu_check.sh`` that are easier in Python: reading a recipe from the
Makefile, checking the cache the reference peers read, and the summary of all steps.

    python tools/gpu_check.py anchor-cache data/processed OUT            # OUT only if the layout differs
    python tools/gpu_check.py summary LOGDIR OUTDIR                      # OUTDIR/summary.{md,json}

Only ``anchor-cache`` needs torch; the rest is the standard library, so the summary is written
even where a step broke the environment.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

# --- The cache the reference peers read ---------------------------------------------------


def anchor_cache(processed: Path, out: Path, data: Path | None = None) -> str:
    """The peers read ``train.pt``/``test.pt`` as dicts of ``images`` (uint8, N x 3 x 32 x 32)
    and ``labels`` (int64, N). Say whether ``processed`` is in that form; if not, write that
    form to ``out``. Without ``processed`` (the pipeline failed), preprocess the image-folder
    archive ``data`` into ``out`` as the pipeline would, so that the peers can still run."""
    import torch

    if not (processed / "train.pt").exists() and data is not None:
        from imgclf.core.params import PreprocessParams
        from imgclf.data.preprocess import preprocess

        preprocess(data, out, PreprocessParams(dataset="imagefolder"))
        made, processed = f"no {processed / 'train.pt'}: preprocessed {data} into {out}; ", out
    else:
        made = ""
    problems, splits = [], {}
    for name in ("train.pt", "test.pt"):
        d = torch.load(processed / name, weights_only=True, mmap=True)
        images, labels = d.get("images"), d.get("labels")
        splits[name] = (images, labels)
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                and tuple(images.shape[1:]) == (3, 32, 32) and images.is_contiguous()):
            problems.append(f"{name}: images {getattr(images, 'dtype', None)} {tuple(getattr(images, 'shape', ()))}")
        if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.ndim == 1
                and len(labels) == len(images)):
            problems.append(f"{name}: labels {getattr(labels, 'dtype', None)} {tuple(getattr(labels, 'shape', ()))}")
    if not problems:
        return f"{made}{processed} has the layout the peers read (uint8 N x 3 x 32 x 32 images, int64 labels)"
    if processed == out:
        raise SystemExit(f"{out}: the preprocess stage's cache does not have the peers' layout: {'; '.join(problems)}")
    out.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in splits.items():
        images = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="area").round().to(torch.uint8) \
            if tuple(images.shape[2:]) != (32, 32) else images
        torch.save({"images": images.contiguous(), "labels": labels.long()}, out / name)
    return f"{processed} differs ({'; '.join(problems)}); wrote the peers' layout to {out}"


# --- Reading each step's results ------------------------------------------------------------


def read_steps(logdir: Path) -> list[dict[str, Any]]:
    """steps.tsv: one line per step as gpu_check.sh finished it."""
    steps = []
    path = logdir / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, rc, wall, limit, note = (line.split("\t") + [""] * 6)[:6]
            steps.append({"step": name, "status": status, "rc": int(rc or 0), "wall_s": float(wall or 0),
                          "limit_s": int(limit or 0), "note": note})
    return steps


STAMP = re.compile(r"^\[\s*([0-9.]+)\] (.*)$")


def stage_seconds(log: Path) -> dict[str, float]:
    """Seconds from each "Running stage 'x'" line of a stamped dvc log to the next one (or to
    the log's last line): each stage's own time plus DVC's bookkeeping after it."""
    if not log.exists():
        return {}
    stamped = [(float(m.group(1)), m.group(2)) for m in map(STAMP.match, log.read_text(errors="replace").splitlines()) if m]
    starts = [(t, re.search(r"Running stage '([^']+)'", text)) for t, text in stamped]
    starts = [(t, m.group(1)) for t, m in starts if m]
    end = stamped[-1][0] if stamped else 0.0
    return {name: round((starts[i + 1][0] if i + 1 < len(starts) else end) - t, 1) for i, (t, name) in enumerate(starts)}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def dvc_run(logdir: Path, step: str) -> dict[str, Any]:
    """What one `dvc exp run` step left: its metrics files (copied by gpu_check.sh) and the
    seconds of each stage."""
    d = logdir / step
    train, evaluate, export = (read_json(d / f) for f in ("train.json", "eval.json", "export.json"))
    epochs = []
    if (d / "train_curve.csv").exists():
        with open(d / "train_curve.csv", newline="") as f:
            epochs = [float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")]
    return {
        "test_acc": (evaluate or {}).get("test_acc"),
        "train_seconds": (train or {}).get("train_seconds"),
        "first_epoch_seconds": epochs[0] if epochs else None,
        "later_epochs_seconds": round(sum(epochs[1:]), 2) if len(epochs) > 1 else None,
        "epochs": (train or {}).get("epochs"),
        "train_images": (train or {}).get("train_images"),
        "train_pflop": (train or {}).get("train_pflop"),
        "images_per_s": (train or {}).get("images_per_s"),
        "serving_files": sorted(k[len("max_abs_diff_"):] for k in (export or {}) if k.startswith("max_abs_diff_")
                                and k[len("max_abs_diff_"):] in ("onnx", "pt2")),
        "stage_seconds": stage_seconds(logdir / f"{step}.log"),
    }


def anchor_runs(text: str) -> dict[str, Any]:
    """The runs an airbench log printed: its table's final row of each run (epoch ``eval``),
    with the test accuracy after test-time augmentation (``tta_val_acc``) and the run's timed
    seconds (the table's last column: whitening, the epochs and the TTA evaluation, each
    synchronised). The first run, ``warmup`` (random labels), is left out, as the peer does."""
    header: list[str] | None = None
    run, runs = None, []
    for line in text.splitlines():
        line = STAMP.sub(r"\2", line).strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "tta_val_acc" in cells:
            header = cells
            continue
        if header is None or len(cells) != len(header):
            continue
        row = dict(zip(header, cells))
        run = row["run"] or run
        if row["epoch"] == "eval" and run != "warmup":
            try:
                runs.append({"run": run, "acc": float(row["tta_val_acc"]), "seconds": float(cells[-1])})
            except ValueError:
                continue
    m = re.search(r"Mean: ([0-9.]+)\s+Std: ([0-9.na]+)", text)
    return {"runs": runs, "printed_mean": float(m.group(1)) if m else None}


def spread(values: list[float]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (as airbench prints, torch.std), with n."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


# --- The summary ---------------------------------------------------------------------------------


def _log_lines(log: Path) -> list[str]:
    """A step's log without its first line (the command) and the stamps."""
    if not log.exists():
        return []
    return [STAMP.sub(r"\2", x) for x in log.read_text(errors="replace").splitlines()[1:]]


def _env_number(name: str) -> float | None:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def summarise(logdir: Path) -> dict[str, Any]:
    steps = read_steps(logdir)
    out: dict[str, Any] = {
        "env": read_json(logdir / "env.json"),  # what the set-up step found: device, versions
        "elapsed_s": _env_number("GPU_CHECK_ELAPSED"),  # gpu_check.sh passes these two
        "budget_s": _env_number("GPU_CHECK_BUDGET"),
        "steps": steps, "results": {},
    }
    results = out["results"]
    for s in steps:
        name = s["step"]
        if name == "pipeline" or _recipe_of(name):
            if s["status"] == "ok":
                results[name] = dvc_run(logdir, name)
            else:
                results[name] = {"stage_seconds": stage_seconds(logdir / f"{name}.log")}
        elif name.startswith("airbench94"):
            log = logdir / f"{name}.log"
            parsed = anchor_runs(log.read_text(errors="replace")) if log.exists() else {"runs": []}
            parsed["acc"] = spread([r["acc"] for r in parsed["runs"]])
            parsed["seconds"] = spread([r["seconds"] for r in parsed["runs"]])
            results[name] = parsed
        elif name == "tests":
            lines = _log_lines(logdir / "tests.log")
            results[name] = {"pytest": next((x.strip("= ") for x in reversed(lines)
                                              if re.search(r"\b(passed|failed|skipped|error|no tests ran)\b", x)), None)}
        elif name == "anchor-cache":
            results[name] = {"message": (_log_lines(logdir / "anchor-cache.log") or [None])[-1]}
    out["recipes"], out["ratios"] = {}, {}
    for recipe in dict.fromkeys(r for r in map(_recipe_of, (s["step"] for s in steps)) if r):
        mine = [s for s in steps if _recipe_of(s["step"]) == recipe]
        seeds = [results[s["step"]] for s in mine if s["status"] == "ok"]
        summary = out["recipes"][recipe] = {
            "acc": spread([r.get("test_acc") for r in seeds]),
            "train_seconds": spread([r.get("train_seconds") for r in seeds]),
            "seeds_ok": len(seeds),
            "seeds_run": len(mine),
        }
        for peer in ("airbench94", "airbench94_muon"):
            p = results.get(peer) or {}
            if summary["acc"] and summary["train_seconds"] and p.get("acc") and p.get("seconds"):
                out["ratios"][f"{recipe} vs {peer}"] = {
                    "accuracy_points": round(100 * (summary["acc"]["mean"] - p["acc"]["mean"]), 2),
                    "time_ratio": round(summary["train_seconds"]["mean"] / p["seconds"]["mean"], 3),
                }
    return out


def _recipe_of(step: str) -> str | None:
    """``speed-seed3`` -> ``speed``: the recipe a seed step ran; None for other steps."""
    found = re.fullmatch(r"(\w+)-seed\d+", step)
    return found.group(1) if found else None


def _pm(s: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
    if not s:
        return ""
    text = fmt.format(s["mean"] * scale)
    if s.get("std") is not None:
        text += " ± " + fmt.format(s["std"] * scale)
    return text + f" (n={s['n']})"


def markdown(summary: dict[str, Any]) -> str:
    env = summary.get("env") or {}
    rows = ["| step | status | wall s | accuracy (mean ± std) | training s (mean ± std) | notes |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    results = summary["results"]
    for s in summary["steps"]:
        name, r = s["step"], results.get(s["step"]) or {}
        acc = train = ""
        notes = [s["note"]] if s["note"] else []
        if name == "pipeline" or _recipe_of(name):
            if r.get("test_acc") is not None:
                acc = f"{100 * r['test_acc']:.2f}%"
            if r.get("train_seconds") is not None:
                train = f"{r['train_seconds']:.2f}"
                if r.get("first_epoch_seconds") is not None:
                    notes.append(f"epoch 1 {r['first_epoch_seconds']:.2f} s")
            if r.get("stage_seconds"):
                notes.append("stages: " + ", ".join(f"{k} {v:g}" for k, v in r["stage_seconds"].items()))
            if r.get("serving_files"):
                notes.append("serving: " + "+".join(r["serving_files"]))
        elif name.startswith("airbench94"):
            acc = _pm(r.get("acc"), "{:.2f}%", 100)
            train = _pm(r.get("seconds"), "{:.2f}")
            if r.get("runs"):
                notes.append("time = whitening + epochs + TTA eval, as the peer times it")
        elif name == "tests" and r.get("pytest"):
            notes.append(r["pytest"])
        elif name == "anchor-cache" and r.get("message"):
            notes.append(r["message"])
        rows.append(f"| {name} | {s['status']} | {s['wall_s']:.1f} | {acc} | {train} | {'; '.join(notes)} |")
    lines = [
        "# GPU check",
        "",
        f"Device: {env.get('device_name') or env.get('device') or 'unknown'}; torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda', '?')}, Python {env.get('python', '?')}; {summary['elapsed_s'] or 0:.0f} s "
        f"of a {summary['budget_s'] or 0:.0f} s budget.",
        "",
        *rows,
        "",
    ]
    for recipe, r in summary["recipes"].items():
        lines.append(
            f"**Recipe {recipe}, {r['seeds_ok']} of {r['seeds_run']} seeds:** test accuracy "
            f"{_pm(r['acc'], '{:.2f}%', 100) or 'n/a'}, training {_pm(r['train_seconds'], '{:.2f}') or 'n/a'} s")
    if summary["recipes"]:
        lines.append("(train.json's train_seconds: the epochs, synchronised; not the model build, the data upload, the "
                     "whitening fit or the test-time-augmented evaluation; epoch 1 includes CUDA's warm-up).")
    for pair, ratio in summary["ratios"].items():
        lines.append(f"- {pair}: accuracy {ratio['accuracy_points']:+.2f} points, time x{ratio['time_ratio']:.3f} "
                     "(ours / the peer's)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("anchor-cache")
    a.add_argument("processed", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--data", type=Path, help="image-folder archive to preprocess when PROCESSED has no train.pt")
    a = sub.add_parser("summary")
    a.add_argument("logdir", type=Path)
    a.add_argument("outdir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "anchor-cache":
        print(anchor_cache(args.processed, args.out, args.data))
    else:
        summary = summarise(args.logdir)
        args.outdir.mkdir(parents=True, exist_ok=True)
        (args.outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.outdir / "summary.md").write_text(markdown(summary))


if __name__ == "__main__":
    sys.exit(main())
