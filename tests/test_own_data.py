"""A user's own image folder through the whole pipeline, and predictions on its files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from imgclf.core.files import file_digest

from helpers import Project, copy_of, new_project, run_env

# A class folder's name may hold a comma and a quote: metrics/predictions.csv must quote it.
RED = 'red, "big"'
COLOURS = {RED: (40, 40, 220), "green": (40, 200, 40), "blue": (210, 60, 30)}  # BGR, as OpenCV writes


def write_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """train/ and test/ class folders of noisy solid-colour images, in several formats."""
    rng = np.random.default_rng(seed)
    exts = [".png", ".jpg", ".bmp"]
    for split, n in per_class.items():
        for name, bgr in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = int(rng.integers(20, 48))  # varied sizes: resizing is exercised
                img = np.clip(np.array(bgr) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                assert cv2.imwrite(str(d / f"{i:03d}{exts[i % 3]}"), img)


def use_own_folder(project: Project) -> Project:
    write_folder(project.path / "data/source/shapes", {"train": 30, "test": 8})
    project.set_params(
        download={"url": "data/source/shapes", "md5": ""},
        preprocess={"dataset": "imagefolder", "image_size": 24},
        train={"epochs": 3, "batch_size": 15, "lr": 0.05},
    )
    return project


@pytest.fixture
def own_project(project):
    return use_own_folder(project)


@pytest.fixture(scope="module")
def own_template(tmp_path_factory, http_server, cifar_archive) -> Path:
    """An own-folder project after one `dvc repro`, committed: built once for this module."""
    return use_own_folder(new_project(tmp_path_factory.mktemp("own") / "proj", http_server, cifar_archive)).reproduce_and_commit()


@pytest.fixture
def own_reproduced(own_template, tmp_path) -> Project:
    return copy_of(own_template, tmp_path / "proj")


def test_image_folder_runs_the_whole_pipeline_and_rerun_rules(own_project):
    proj = own_project
    assert proj.ran_stages(proj.dvc("repro")) == ["params", "download", "preprocess", "train", "export", "evaluate"]
    meta = json.loads((proj.path / "data/processed/meta.json").read_text())
    assert meta["classes"] == ["blue", "green", RED]
    assert (meta["num_train"], meta["num_test"], meta["image_size"]) == (90, 24, 24)
    ev = json.loads((proj.path / "metrics/eval.json").read_text())
    assert set(ev["per_class_acc"]) == {"blue", "green", RED} and ev["test_acc"] > 0.6

    assert proj.ran_stages(proj.dvc("repro")) == []  # nothing changed, nothing runs

    # Changing one image reruns everything downstream of the data.
    victim = proj.path / "data/source/shapes/train" / RED / "000.png"
    img = cv2.imread(str(victim))
    img[0, 0] = (0, 0, 0)
    cv2.imwrite(str(victim), img)
    assert proj.ran_stages(proj.dvc("repro")) == ["download", "preprocess", "train", "export", "evaluate"]


def test_predictions_match_the_evaluate_stage(own_reproduced):
    proj = own_reproduced
    test_dir = proj.path / "data/source/shapes/test"
    out = subprocess.run(
        [sys.executable, "-m", "imgclf.serve.predict", "--model", "models/model_state.pt", "--json", "--top-k", "3", str(test_dir)],
        cwd=proj.path, env=run_env(), capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    predicted = json.loads(out.stdout)
    assert len(predicted) == 24
    # The evaluate stage's rows follow the cache's order: by class, then by path.
    with open(proj.path / "metrics/predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["actual", "predicted"] and all(len(r) == 2 for r in rows)  # RED's comma is quoted
    rows = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    files = sorted(predicted, key=lambda r: (Path(r["path"]).parent.name, r["path"]))
    assert len(rows) == len(files) == 24
    for row, pred in zip(rows, files, strict=True):
        assert row["actual"] == Path(pred["path"]).parent.name
        assert row["predicted"] == pred["top"][0]["class"], pred["path"]
        assert sum(t["prob"] for t in pred["top"]) == pytest.approx(1.0, abs=1e-4)
    # ...and `dvc plots show` still reads it: the confusion matrix has the class whole.
    plots = json.loads(proj.dvc("plots", "show", "--json").stdout)["data"]
    confusion = json.dumps(plots["Confusion matrix"])
    assert json.dumps({"actual": RED})[1:-1] in confusion, confusion[:500]

    # A file name that is not UTF-8, printed to a strict UTF-8 stdout: shown escaped, and every
    # other result still printed.
    odd = proj.path / os.fsdecode(b"odd-\xff.png")
    shutil.copy(test_dir / "green" / "000.png", odd)
    env = run_env() | {"PYTHONIOENCODING": "utf-8:strict"}
    text = subprocess.run(
        [sys.executable, "-m", "imgclf.serve.predict", "--model", "models/model_state.pt", str(test_dir / "blue"), odd.name],
        cwd=proj.path, env=env, capture_output=True,
    )
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode("utf-8").splitlines()  # valid UTF-8
    assert len(lines) == 8 + 1 and re.fullmatch(r"odd-\\xff\.png: \S.* \(\d+\.\d%\).*", lines[-1]), lines
    as_json = subprocess.run(
        [sys.executable, "-m", "imgclf.serve.predict", "--model", "models/model_state.pt", "--json", odd.name],
        cwd=proj.path, env=env, capture_output=True,
    )
    assert as_json.returncode == 0 and json.loads(as_json.stdout.decode("utf-8"))[0]["path"] == "odd-\\xff.png"


def predict_json(proj, model: str, folder: Path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "imgclf.serve.predict", "--model", model, "--json", "--top-k", "3", str(folder)],
                         cwd=proj.path, env=run_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return sorted(json.loads(out.stdout), key=lambda r: (Path(r["path"]).parent.name, r["path"]))


def test_with_test_time_augmentation_predict_and_serving_see_what_evaluate_sees(own_reproduced):
    """TTA is part of the exported model: evaluate, predict and the ONNX file all average the
    same 6 views (flip x 3 shifts), and that differs from the plain model's answers."""
    from imgclf.models.bundle import model_from_bundle, read_bundle
    from imgclf.serve.predict import predict_files

    proj = own_reproduced
    proj.set_params(export={"tta_flip": True, "tta_shift": 2, "onnx": True})
    assert proj.ran_stages(proj.dvc("repro")) == ["params", "export", "evaluate"]
    ev = json.loads((proj.path / "metrics/eval.json").read_text())
    assert (ev["tta_flip"], ev["tta_shift"]) == (True, 2)
    test_dir = proj.path / "data/source/shapes/test"
    torch_preds = predict_json(proj, "models/model_state.pt", test_dir)
    onnx_preds = predict_json(proj, "models/serving/model.onnx", test_dir)
    with open(proj.path / "metrics/predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(torch_preds) == len(onnx_preds) == 24
    for row, t, o in zip(rows, torch_preds, onnx_preds, strict=True):
        assert row["predicted"] == t["top"][0]["class"] == o["top"][0]["class"], t["path"]
        assert [c["class"] for c in t["top"]] == [c["class"] for c in o["top"]]
        assert [c["prob"] for c in t["top"]] == pytest.approx([c["prob"] for c in o["top"]], abs=1e-4)
    bundle = read_bundle(proj.path / "models/model_state.pt")
    assert bundle["tta"] == {"flip": True, "shift": 2}
    plain = sorted(predict_files(model_from_bundle(bundle), bundle, [test_dir]),
                   key=lambda r: (Path(r["path"]).parent.name, r["path"]))
    # The averaging is applied: not the single view's probabilities. (These easy images are
    # classified with near-certainty either way, so the runners-up show the difference.)
    gap = max(abs(math.log(p["top"][-1]["prob"]) - math.log(t["top"][-1]["prob"]))
              for p, t in zip(plain, torch_preds, strict=True))
    assert gap > 0.01, gap  # 0.12 here; identical views would give ~1e-6


def test_zip_archive_over_http_with_checksum(project, http_root, http_server, tmp_path):
    folder = tmp_path / "pets"
    write_folder(folder, {"train": 4, "val": 2}, seed=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"pets/{f.relative_to(folder).as_posix()}")
    (http_root / "pets.zip").write_bytes(buf.getvalue())
    project.set_params(preprocess={"dataset": "imagefolder"},
                       download={"url": f"{http_server}/pets.zip", "md5": file_digest(http_root / "pets.zip")})
    assert project.ran_stages(project.dvc("repro", "preprocess")) == ["download", "preprocess"]
    meta = json.loads((project.path / "data/processed/meta.json").read_text())
    assert meta["classes"] == ["blue", "green", RED] and (meta["num_train"], meta["num_test"]) == (12, 6)
