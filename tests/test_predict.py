"""The prediction command: per-file errors, text and JSON output, and the same pixels as training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.core.params import ModelParams
from imgclf.data.decode import load_image_file
from imgclf.data.imagefolder import read_archive
from imgclf.models import registry as models
from imgclf.models.bundle import load_state_dict_model, make_bundle
from imgclf.serve import serving
from imgclf.serve.predict import main, predict_files

from helpers import make_tar, save_state_bundle, save_whole_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat", "dog"]
SIZE = 16


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained seed_cnn_bn exported as the export stage does it (model.onnx beside it)."""
    torch.manual_seed(0)
    args = models.arch_args(ModelParams(arch="seed_cnn_bn"), num_classes=len(CLASSES), image_size=SIZE)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = models.build("seed_cnn_bn", args, mean, std).eval()
    bundle = make_bundle(model, arch="seed_cnn_bn", arch_args=args, classes=CLASSES, mean=mean, std=std, image_size=SIZE)
    path = tmp_path_factory.mktemp("model") / "model_state.pt"
    save_state_bundle(bundle, path)
    save_whole_model(model, path.with_name("model.pt"))
    serving.write(model, path.parent, ["onnx"], serving.metadata(bundle))
    return path


def _encode(ext: str, img: np.ndarray, params: tuple = ()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """One file per mode (different sizes, so resizing runs), plus two that must fail."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    files = {
        "photo.jpg": _encode(".jpg", colour),
        "gray.png": _encode(".png", colour[:, :, 0]),
        "rgba.png": _encode(".png", np.dstack([colour, colour[:, :, :1]])),
        "deep.png": _encode(".png", colour.astype(np.uint16) * 257),
        "small.bmp": _encode(".bmp", colour[:8, :8]),
        "clip.webp": _encode(".webp", colour, (cv2.IMWRITE_WEBP_QUALITY, 90)),
        "notes.txt": b"this is not an image",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / name
        paths[name].write_bytes(data)
    pal = Image.fromarray(colour[:, :, ::-1].copy()).convert("P", palette=Image.Palette.ADAPTIVE)
    paths["palette.png"] = d / "palette.png"
    pal.save(paths["palette.png"])
    paths["missing.jpg"] = d / "missing.jpg"
    return paths


GOOD = ["photo.jpg", "gray.png", "rgba.png", "deep.png", "small.bmp", "clip.webp", "palette.png"]
BAD = ["notes.txt", "missing.jpg"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "imgclf.serve.predict", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_text_reports_bad_files_and_classifies_the_rest(model_file, images):
    order = [GOOD[0], BAD[0], *GOOD[1:], BAD[1]]
    proc = run_cli("--model", str(model_file), "--top-k", "2", *(str(images[n]) for n in order))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == len(GOOD)
    for line, name in zip(out, GOOD):
        path, top = line.split(": ", 1)
        assert path == str(images[name])
        shown = top.split(", ")
        assert len(shown) == 2 and all(s.split(" (")[0] in CLASSES and s.endswith("%)") for s in shown)
    assert f"{images['notes.txt']}: error: not an image" in proc.stderr
    assert f"{images['missing.jpg']}: error: no such file" in proc.stderr


def test_cli_json_matches_the_model_on_the_decoded_tensor(model_file, images):
    order = [*GOOD, *BAD]
    proc = run_cli("--model", str(model_file), "--json", "--top-k", "9", *(str(images[n]) for n in order))
    assert proc.returncode == 1, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["path"] for r in results] == [str(images[n]) for n in order]
    assert {r["path"] for r in results if "error" in r} == {str(images[n]) for n in BAD}

    model, bundle = load_state_dict_model(model_file)
    for result in results[: len(GOOD)]:
        x = torch.from_numpy(load_image_file(result["path"], SIZE)).permute(2, 0, 1)[None]
        with torch.no_grad():
            probs = model(x).softmax(dim=1)[0]
        assert len(result["top"]) == len(CLASSES)  # --top-k beyond the classes shows them all
        got = [t["prob"] for t in result["top"]]
        assert got == sorted(got, reverse=True)
        for t in result["top"]:
            assert t["prob"] == pytest.approx(probs[CLASSES.index(t["class"])].item(), abs=1e-5)


def test_predict_files_equals_softmax_of_the_model(model_file, images):
    model, bundle = load_state_dict_model(model_file)
    paths = [images[n] for n in [*GOOD, *BAD]]
    results = predict_files(model, bundle, paths, top_k=1, batch_size=3)  # several batches
    assert [("error" in r) for r in results] == [False] * len(GOOD) + [True] * len(BAD)
    x = torch.stack([torch.from_numpy(load_image_file(p, SIZE)).permute(2, 0, 1) for p in paths[: len(GOOD)]])
    with torch.no_grad():
        best, idx = model(x).softmax(dim=1).max(dim=1)
    for r, p, i in zip(results, best.tolist(), idx.tolist()):
        assert r["top"] == [{"class": CLASSES[i], "prob": pytest.approx(p, abs=1e-6)}]


def test_prediction_sees_the_pixels_training_saw(tmp_path, images):
    members = {f"train/a/{n}": images[n].read_bytes() for n in GOOD}
    members["test/a/x.png"] = members["train/a/gray.png"]
    archive = make_tar(tmp_path / "d.tar", members, mode="w")
    train = read_archive(archive, image_size=SIZE).train
    for img, name in zip(train.images, sorted(GOOD)):
        assert torch.equal(img, torch.from_numpy(load_image_file(images[name], SIZE)).permute(2, 0, 1)), name


def test_folders_are_searched_for_images(model_file, images, tmp_path, capsys):
    folder = tmp_path / "holiday"
    (folder / "day2").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(images["photo.jpg"].read_bytes())
    (folder / "day2" / "B.PNG").write_bytes(images["gray.png"].read_bytes())
    (folder / "notes.md").write_text("skipped: not an image suffix")
    (folder / ".hidden.jpg").write_text("skipped: hidden")
    (tmp_path / "empty").mkdir()
    code = main(["--model", str(model_file), "--json", str(folder), str(tmp_path / "empty")])
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == [str(folder / "a.jpg"), str(folder / "day2" / "B.PNG"), str(tmp_path / "empty")]
    assert "top" in results[0] and "top" in results[1] and "no image files" in results[2]["error"]
    assert code == 1


def test_whole_model_gives_the_same_answers(model_file, images, capsys):
    files = [str(images[n]) for n in GOOD]
    assert main(["--model", str(model_file), "--json", *files]) == 0
    state = json.loads(capsys.readouterr().out)
    assert main(["--whole-model", str(model_file.with_name("model.pt")), "--model", str(model_file), "--json", *files]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == state
    assert "trust" in captured.err


def test_model_and_usage_errors_exit_2(model_file, images, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope.pt"), str(images["photo.jpg"])]) == 2
    assert "nope.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    assert main(["--model", str(junk), str(images["photo.jpg"])]) == 2
    assert main(["--whole-model", str(tmp_path / "nope.pt"), "--model", str(model_file), str(images["photo.jpg"])]) == 2
    for argv in (["--top-k", "0", "x.jpg"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_onnx_model_gives_the_same_top_k_as_pytorch(model_file, images, capsys):
    """`--model model.onnx` runs the file with onnxruntime; class names and image size come
    from its metadata."""
    files = [str(images[n]) for n in GOOD]
    assert main(["--model", str(model_file), "--json", "--top-k", "3", *files]) == 0
    torch_results = json.loads(capsys.readouterr().out)
    proc = run_cli("--model", str(model_file.with_name("model.onnx")), "--json", "--top-k", "3", *files)
    assert proc.returncode == 0, proc.stderr
    onnx_results = json.loads(proc.stdout)
    assert [r["path"] for r in onnx_results] == files
    for o, t in zip(onnx_results, torch_results):
        assert [x["class"] for x in o["top"]] == [x["class"] for x in t["top"]], o["path"]
        assert [x["prob"] for x in o["top"]] == pytest.approx([x["prob"] for x in t["top"]], abs=1e-5)


def test_onnx_prediction_needs_no_architecture_code(tmp_path, images, capsys):
    """An ONNX file of a network imgclf cannot build still classifies: nothing is rebuilt."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, len(CLASSES)))
    model = models.Classifier(net, [0.5] * 3, [0.25] * 3).eval()
    meta = {"format": serving.FORMAT, "version": serving.VERSION, "arch": "not_in_imgclf", "arch_args": {},
            "classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": SIZE}
    onnx_file = serving.write(model, tmp_path, ["onnx"], meta)["onnx"]
    assert main(["--model", str(onnx_file), "--json", "--top-k", "1", str(images["photo.jpg"])]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    x = torch.from_numpy(load_image_file(images["photo.jpg"], SIZE)).permute(2, 0, 1)[None]
    with torch.no_grad():
        prob, idx = model(x).softmax(dim=1).max(dim=1)
    assert result["top"] == [{"class": CLASSES[idx.item()], "prob": pytest.approx(prob.item(), abs=1e-5)}]


def test_onnx_files_without_our_metadata_exit_2(tmp_path, images, capsys):
    bare = tmp_path / "bare.onnx"
    torch.onnx.export(torch.nn.Flatten().eval(), (torch.zeros(2, 3, SIZE, SIZE),), bare, dynamo=True,
                      external_data=False, verbose=False)
    assert main(["--model", str(bare), str(images["photo.jpg"])]) == 2
    assert "no imgclf-serving metadata (missing: format, arch, arch_args, classes, mean, std, image_size)" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["--model", str(junk), str(images["photo.jpg"])]) == 2
    assert "junk.onnx: not a loadable ONNX file" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nope.onnx"), str(images["photo.jpg"])]) == 2
    assert "nope.onnx: no such model file" in capsys.readouterr().err
