"""`python -m imgclf.bench --quick`, run as `make bench` runs it: every measurement is in the
JSON with positive numbers, and every ratio follows from the numbers it names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_env

DVC_YAML = """\
stages:
  touch:
    cmd: python -c "open('out.txt', 'w').write('x')"
    outs:
      - out.txt
"""


@pytest.fixture(scope="module")
def up_to_date_project(tmp_path_factory) -> Path:
    """The smallest DVC project, reproduced once: a `dvc repro` there has nothing to do."""
    proj = tmp_path_factory.mktemp("dvcproj")
    (proj / "dvc.yaml").write_text(DVC_YAML)
    for args in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, env=run_env(), check=True, capture_output=True, timeout=120)
    return proj


@pytest.fixture(scope="module")
def bench(tmp_path_factory, up_to_date_project) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "imgclf.bench", "--quick", "--device", "cpu", "--json", str(out), "--project", str(up_to_date_project)],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_measurement_is_there_and_positive(bench):
    results, _ = bench
    rows = results["throughput"]
    for recipe in ("seed_cnn", "fast"):
        mine = [r for r in rows if r["recipe"] == recipe]
        kinds = {(r["kind"], r["workers"]) for r in mine}
        assert kinds == {("pipeline", None), ("compute", None), ("classic", 0), ("classic", 2)}
        assert {r["precision"] for r in mine} >= {"fp32"}
        assert {r["channels_last"] for r in mine} == {True, False}
        assert len({r["batch"] for r in mine}) == 2  # the batch-size comparison
        if results["machine"]["cores_usable"] > 1:
            assert {r["threads"] for r in mine} == {1, results["machine"]["torch_threads"]}
    for r in rows:
        assert len(r["repeats"]) >= 5 and all(v > 0 for v in r["repeats"])
        assert min(r["repeats"]) <= r["images_per_s"] <= max(r["repeats"])  # the median
        assert 0 < r["peak_fraction"] < 1.5  # faster than the FLOP peak means a step did no work
    assert all(v > 0 for v in results["flops_per_image"].values())
    assert all(p["flops_per_s"] > 0 for p in results["peak"])
    assert {p["precision"] for p in results["peak"]} >= {"fp32"}
    pre = results["preprocess"]
    assert pre["seconds"] > 0 and pre["cache_bytes"] > 0 and pre["load_seconds"] > 0
    dvc = results["dvc_noop"]
    assert "skipped" not in dvc, dvc
    assert len(dvc["runs"]) == 3 and dvc["seconds"] > 0
    epoch = results["train_epoch"]
    assert epoch["seconds"] > 0 and epoch["images_per_s"] > 0
    assert results["denormal"]["flush_off"] > 0 and results["denormal"]["flush_on"] > 0
    assert results["data"]["synthetic"] and results["machine"]["cpu"]


def test_ratios_follow_from_the_numbers(bench):
    results, _ = bench
    rows = {r["id"]: r for r in results["throughput"]}
    values = {i: r["images_per_s"] for i, r in rows.items()} | {"train_epoch": results["train_epoch"]["images_per_s"]}
    peaks = {(p["precision"], p["threads"]): p["flops_per_s"] for p in results["peak"]}
    all_threads = results["machine"]["torch_threads"]
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["images_per_s"] / rows[r["reference"]]["images_per_s"])
        peak = peaks.get((r["precision"], 0 if r["threads"] == all_threads else r["threads"]))
        assert r["peak_fraction"] == pytest.approx(r["images_per_s"] * results["flops_per_image"][r["recipe"]] / peak)
    names = [q["name"] for q in results["ratios"]]
    assert names.count("data-path overhead") >= 4
    assert sum(n.startswith("pipeline / classic") for n in names) == 4
    assert "train() epoch / bench pipeline" in names
    for q in results["ratios"]:
        a, b = values[q["a"]], values[q["b"]]
        assert (q["a_value"], q["b_value"]) == (a, b)
        expected = a / b if q["formula"] == "a/b" else 1 - a / b
        assert q["value"] == pytest.approx(expected)
    overhead = next(q for q in results["ratios"] if q["name"] == "data-path overhead")
    assert rows[overhead["a"]]["kind"] == "pipeline" and rows[overhead["b"]]["kind"] == "compute"


def test_the_printed_table_shows_the_json_numbers(bench):
    results, stdout = bench
    assert results["report"] in stdout
    assert "| measurement | images/s | ratio | % of peak | notes |" in stdout
    for r in results["throughput"]:
        assert f"| {r['images_per_s']:.0f} | {r['ratio']:.2f} |" in stdout
    assert "SYNTHETIC" in stdout and "no-op `dvc repro`" in stdout
