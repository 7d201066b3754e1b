"""tools/gpu_check.sh on the CPU: its plumbing (set-up, a copy of the project without .git, a
time-boxed `dvc exp run`, the cache check, skipped steps, the summaries and the log archive)
and the parts of tools/gpu_check.py that read what the GPU steps print."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import pytest

from helpers import CLASSES, make_split, make_tar, run_env

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_folder_archive(path: Path, train: int, test: int) -> Path:
    """A tiny image-folder archive (PNG files under tiny/{train,test}/<class>/)."""
    members = {}
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        s = make_split(n, seed)
        for i, (img, label) in enumerate(zip(s.images, s.labels)):
            ok, buf = cv2.imencode(".png", img.permute(1, 2, 0).numpy()[:, :, ::-1])
            assert ok
            members[f"tiny/{split}/{CLASSES[label]}/{i:04d}.png"] = buf.tobytes()
    return make_tar(path, members)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_dry_run_on_the_cpu_runs_records_and_summarises_each_step(tmp_path):
    """The script as a GPU machine gets it (a working tree without .git), DEVICE=cpu, the
    speed recipe for one 1-epoch seed on 100 images, then the cache check; the peers are
    skipped on a CPU. ~30 s on 2 cores."""
    tree = tmp_path / "tree"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    archive = image_folder_archive(tmp_path / "tiny.tar.gz", 100, 20)
    out = tmp_path / "out"
    env = run_env() | {
        "PYTHON": sys.executable, "DATA": str(archive), "DATA_MD5": "", "DEVICE": "cpu", "QUICK": "1",
        "STEPS": "speed anchors", "RECIPES": "speed muon", "EXTRA_ARGS": "-S export.onnx=false -S export.pt2=false -S model.width=16",
        "ANCHORS": str(tmp_path / "no-anchors"), "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(tree / "tools" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        ("setup", "ok"), ("speed-seed0", "ok"), ("muon-seed0", "ok"), ("anchor-cache", "ok"),
        ("airbench94", "skipped"), ("airbench94_muon", "skipped")]
    seed = summary["results"]["speed-seed0"]
    assert 0 <= seed["test_acc"] <= 1 and seed["train_seconds"] > 0 and seed["epochs"] == 1
    assert seed["train_images"] == 100  # the recipe's val_fraction=0: all of them
    assert list(seed["stage_seconds"]) == ["params", "download", "preprocess", "train", "export", "evaluate"]
    assert summary["recipes"]["speed"]["seeds_ok"] == 1 and summary["env"]["device"] == "cpu"
    muon = summary["results"]["muon-seed0"]  # recipes/muon.yaml, run as the GPU issue runs it
    assert 0 <= muon["test_acc"] <= 1 and muon["epochs"] == 1 and summary["recipes"]["muon"]["seeds_ok"] == 1
    table = (out / "summary.md").read_text()
    assert "| speed-seed0 | ok |" in table and "the peers run on CUDA only" in table
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"logs/setup.log", "logs/speed-seed0.log", "logs/speed-seed0/train.json", "logs/steps.tsv"} <= names
        log = tar.extractfile("logs/speed-seed0.log").read().decode()
    assert log.startswith("$ ") and "[" in log.splitlines()[1]  # the command, then stamped lines
    assert not (tree / "metrics").exists() and not (tree / "data" / "processed").exists()  # ran in a copy


def test_the_peers_runs_are_read_from_their_table():
    """A peer prints one table: a row per epoch, the run's name on its first row only, a
    final row per run whose epoch is 'eval' (TTA accuracy, then the timed seconds last)."""
    header = ["run", "epoch", "train_acc", "val_acc", "tta_val_acc", "time_seconds"]
    lines = ["-" * 40, "|  " + "  |  ".join(header) + "  |", "-" * 40]
    for run, acc, secs in (("warmup", 0.1, 9.0), ("0", 0.935, 3.1), ("1", 0.941, 3.3)):
        lines.append(f"|  {run}  |  0  |  0.5  |  0.8  |     |  1.0  |")
        lines.append(f"|     |  eval  |  0.5  |  0.9  |  {acc:.4f}  |  {secs:.4f}  |")
    lines.append("Mean: 0.9380    Std: 0.0042")
    stamped = "\n".join(f"[{i:6d}.0] {line}" for i, line in enumerate(lines))
    parsed = gpu_check().anchor_runs(stamped)
    assert parsed["runs"] == [{"run": "0", "acc": 0.935, "seconds": 3.1}, {"run": "1", "acc": 0.941, "seconds": 3.3}]
    assert parsed["printed_mean"] == 0.938


def test_the_summary_gives_each_step_and_the_ratios_to_the_peers(tmp_path, monkeypatch):
    gc = gpu_check()
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [("speed-seed0", "ok"), ("speed-seed1", "ok"), ("speed-seed2", "timeout"), ("muon-seed0", "ok"),
            ("airbench94", "ok")]
    (logs / "steps.tsv").write_text("".join(f"{n}\t{s}\t0\t20.5\t90\t\n" for n, s in rows))
    for name, acc, secs in (("speed-seed0", 0.94, 4.0), ("speed-seed1", 0.96, 6.0), ("muon-seed0", 0.945, 4.0)):
        (logs / name).mkdir()
        (logs / name / "eval.json").write_text(json.dumps({"test_acc": acc}))
        (logs / name / "train.json").write_text(json.dumps({"train_seconds": secs, "epochs": 10}))
        (logs / name / "train_curve.csv").write_text("epoch,seconds\n1,1.5\n2,0.5\n")
        (logs / f"{name}.log").write_text("[     1.0] Running stage 'train':\n[     7.5] Running stage 'export':\n"
                                          "[     9.0] done\n")
    (logs / "airbench94.log").write_text("|  run  |  epoch  |  tta_val_acc  |  total_time_seconds  |\n"
                                         "|  0  |  eval  |  0.9400  |  4.0000  |\n|  1  |  eval  |  0.9400  |  6.0000  |\n")
    monkeypatch.setenv("GPU_CHECK_ELAPSED", "300")
    monkeypatch.setenv("GPU_CHECK_BUDGET", "540")
    gc.main(["summary", str(logs), str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    speed, muon = summary["recipes"]["speed"], summary["recipes"]["muon"]
    assert speed["acc"] == {"mean": pytest.approx(0.95), "std": pytest.approx(0.01414, rel=1e-3), "n": 2}
    assert speed["seeds_ok"] == 2 and speed["seeds_run"] == 3
    assert muon["acc"] == {"mean": pytest.approx(0.945), "std": None, "n": 1} and muon["seeds_run"] == 1
    assert summary["results"]["speed-seed0"]["stage_seconds"] == {"train": 6.5, "export": 1.5}
    assert summary["results"]["speed-seed0"]["first_epoch_seconds"] == 1.5
    assert summary["ratios"]["speed vs airbench94"] == {"accuracy_points": 1.0, "time_ratio": 1.0}
    assert summary["ratios"]["muon vs airbench94"] == {"accuracy_points": 0.5, "time_ratio": 0.8}
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| airbench94 | ok | 20.5 | 94.00% ± 0.00% (n=2) | 5.00 ± 1.41 (n=2) |" in table
    assert "| speed-seed2 | timeout |" in table and "300 s of a 540 s budget" in table


def test_the_peers_cache_is_the_pipelines_or_made_in_their_layout(tmp_path):
    """The peers read uint8 N x 3 x 32 x 32 images and int64 labels: a pipeline cache in that
    form is used as it is, another is converted, and without one the archive is preprocessed."""
    import torch

    from imgclf.core.params import PreprocessParams
    from imgclf.data.preprocess import preprocess

    gc = gpu_check()
    archive = image_folder_archive(tmp_path / "tiny.tar.gz", 30, 10)
    preprocess(archive, tmp_path / "p32", PreprocessParams(dataset="imagefolder"))
    assert "has the layout" in gc.anchor_cache(tmp_path / "p32", tmp_path / "out32", archive)
    assert not (tmp_path / "out32").exists()
    preprocess(archive, tmp_path / "p16", PreprocessParams(dataset="imagefolder", image_size=16))
    assert "differs" in gc.anchor_cache(tmp_path / "p16", tmp_path / "out16", archive)
    assert "preprocessed" in gc.anchor_cache(tmp_path / "none", tmp_path / "made", archive)
    for folder, n in (("out16", 30), ("made", 30)):
        d = torch.load(tmp_path / folder / "train.pt", weights_only=True)
        assert d["images"].dtype == torch.uint8 and d["images"].shape == (n, 3, 32, 32)
        assert d["labels"].dtype == torch.int64 and len(d["labels"]) == n
