"""The whole pipeline (train, evaluate, export) through real `dvc` commands on tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from imgclf.models.bundle import load_state_dict_model, load_whole_model
from imgclf.serve.serving import OnnxClassifier, load_pt2

from helpers import ROOT, SERVING, default_sigint, run_env

OUTPUTS = [
    "data/raw/cifar-10-python.tar.gz", "data/processed/train.pt", "data/processed/test.pt",
    "data/processed/meta.json", "models/trained.pt", "models/model.pt", "models/model_state.pt",
    "models/serving/model.onnx", "models/serving/model.pt2",
    "metrics/train.json", "metrics/train_curve.csv", "metrics/eval.json", "metrics/predictions.csv",
    "metrics/export.json", "metrics/live/metrics.json",
]


def test_full_repro_writes_every_declared_output(project):
    project.set_params(export=SERVING)  # as params.yaml has it
    proc = project.dvc("repro")
    assert project.ran_stages(proc) == ["params", "download", "preprocess", "train", "export", "evaluate"]
    for rel in OUTPUTS:
        assert (project.path / rel).is_file(), rel
    # TensorBoard: the per-epoch scalars, and the Custom Scalars tab's charts named by what
    # their y axis shows, train and val together.
    tensorboard = tensorboard_log(project.path / "logs/train")
    assert {"loss/train", "loss/val", "acc/train", "acc/val", "perf/lr"} <= set(tensorboard["scalars"])
    assert tensorboard["charts"] == {"loss (cross-entropy): train and val": ["^loss/train$", "^loss/val$"],
                                     "accuracy (fraction right): train and val": ["^acc/train$", "^acc/val$"],
                                     "learning rate": ["^perf/lr$"],
                                     "training speed (images per second)": ["^perf/images_per_s$"]}

    ev = json.loads((project.path / "metrics/eval.json").read_text())
    assert set(ev["per_class_acc"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert ev["test_acc"] > 0.3  # the tiny classes differ by colour: far above chance (0.1)
    curve = (project.path / "metrics/train_curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,train_loss") and len(curve) == 1 + 2
    assert len((project.path / "metrics/predictions.csv").read_text().splitlines()) == 1 + 50

    # Nothing is written where DVC does not know: every new file is a declared output,
    # DVC's own bookkeeping (dvc.lock, .gitignore entries, .dvc/), or git's.
    declared = ("data/raw/", "data/processed/", "logs/preprocess/", "logs/train/", "models/", "metrics/")
    new = project.git("ls-files", "--others").stdout.split()
    stray = [f for f in new if not f.startswith(declared + (".dvc/",)) and f != "dvc.lock"
             and not f.endswith(".gitignore") and "__pycache__/" not in f]  # Python's own, git-ignored
    assert stray == [], stray
    metrics_files = {f for f in new if f.startswith("metrics/")}
    assert metrics_files == {f for f in OUTPUTS if f.startswith("metrics/")}

    # `dvc plots show` renders the curves and the confusion matrix, with named axes.
    plots = json.loads(project.dvc("plots", "show", "--json").stdout)["data"]
    assert set(plots) == {"Loss", "Accuracy", "Accuracy per compute", "Confusion matrix"}
    confusion = json.dumps(plots["Confusion matrix"])
    assert '"actual": "airplane"' in confusion and '"predicted"' in confusion
    specs = {name: plot[0]["content"] for name, plot in plots.items()}
    assert axis_titles(specs["Loss"]) == {"x": {"epoch"}, "y": {"loss (cross-entropy)"}}
    assert axis_titles(specs["Accuracy"]) == {"x": {"epoch"}, "y": {"accuracy (fraction right)"}}
    assert axis_titles(specs["Accuracy per compute"]) == {"x": {"training compute (PFLOP, forward + backward)"},
                                                          "y": {"val accuracy (fraction right)"}}
    assert axis_titles(specs["Confusion matrix"]) == {"x": {"actual class"}, "y": {"predicted class"}}
    assert "test images" in specs["Confusion matrix"]["title"]["text"]
    # The project's templates (.dvc/plots/): ticks on whole epochs only, PFLOP labels that
    # cannot run into each other, a titled colour scale with the count in every cell.
    for name in ("Loss", "Accuracy"):
        assert specs[name]["encoding"]["x"]["axis"] == {"tickMinStep": 1, "format": "d"}
    compute_axis = specs["Accuracy per compute"]["encoding"]["x"]["axis"]
    assert compute_axis["labelOverlap"] and compute_axis["labelAngle"] and compute_axis["format"] == "~g"
    rect, counts = specs["Confusion matrix"]["spec"]["layer"]
    assert rect["encoding"]["color"]["title"] == "test images" and counts["mark"]["type"] == "text"
    # Train is the solid line and val the dashed one, whatever the revision's colour.
    dashes = specs["Loss"]["encoding"]["strokeDash"]["scale"]
    assert dict(zip(dashes["domain"], dashes["range"])) == {"train_loss": [1, 0], "val_loss": [8, 8]}

    # Nothing changed: nothing reruns.
    assert project.ran_stages(project.dvc("repro")) == []


def tensorboard_log(log_dir: Path) -> dict:
    """The scalar tags of a TensorBoard log and its Custom Scalars charts (title: tag patterns),
    read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir))
    events.Reload()
    layout = layout_pb2.Layout()
    config = events.Tensors("custom_scalars__config__")[0].tensor_proto
    layout.ParseFromString(tensor_util.make_ndarray(config).item())
    charts = {c.title: list(c.multiline.tag) for category in layout.category for c in category.chart}
    return {"scalars": events.Tags()["scalars"], "charts": charts}


def axis_titles(spec) -> dict[str, set[str]]:
    """The titles of the x and y axes anywhere in a Vega-Lite spec (layers, facets)."""
    found: dict[str, set[str]] = {"x": set(), "y": set()}

    def walk(node) -> None:
        if isinstance(node, dict):
            for axis in ("x", "y"):
                enc = (node.get("encoding") or {}).get(axis)
                if isinstance(enc, dict) and "title" in enc:
                    found[axis].add(enc["title"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    return found


def test_train_param_reruns_only_downstream(reproduced):
    project = reproduced
    assert project.ran_stages(project.dvc("repro")) == []
    project.set_params(train={"lr": 0.01})
    assert project.ran_stages(project.dvc("repro")) == ["params", "train", "export", "evaluate"]
    project.set_params(evaluate={"batch_size": 7})
    assert project.ran_stages(project.dvc("repro")) == ["params", "evaluate"]
    project.set_params(export={"tta_flip": True})  # part of the exported model, which evaluate evaluates
    assert project.ran_stages(project.dvc("repro")) == ["params", "export", "evaluate"]
    assert json.loads((project.path / "metrics/eval.json").read_text())["tta_flip"] is True


def test_editing_one_folders_code_reruns_only_the_stages_that_import_it(reproduced):
    """dvc.yaml declares per stage the code folders it runs: imgclf/serve/ is export's and
    evaluate's, not train's, so editing it leaves the trained model up to date. The bytecode
    Python writes beside the code (__pycache__/, in .dvcignore) changes nothing."""
    project = reproduced
    (project.path / "imgclf/train/__pycache__").mkdir(exist_ok=True)
    (project.path / "imgclf/train/__pycache__/loop.cpython-311.pyc").write_bytes(b"bytecode")
    assert json.loads(project.dvc("status", "--json").stdout) == {}
    with open(project.path / "imgclf/serve/export.py", "a") as f:
        f.write("\n# an edit to the export stage's code\n")
    status = project.dvc("status", "--json")
    assert set(json.loads(status.stdout)) == {"export", "evaluate"}, status.stdout
    assert project.ran_stages(project.dvc("repro")) == ["export", "evaluate"]


def test_exports_give_identical_logits(reproduced):
    project = reproduced
    project.set_params(export=SERVING)
    # The serving files are new; the state_dict bundle, which evaluate reads, is byte for byte the same.
    assert project.ran_stages(project.dvc("repro")) == ["params", "export"]
    images = torch.load(project.path / "data/processed/test.pt", weights_only=True)["images"][:16]
    state_model, bundle = load_state_dict_model(project.path / "models/model_state.pt")
    whole = load_whole_model(project.path / "models/model.pt")
    with torch.no_grad():
        assert torch.equal(state_model(images), whole(images))
    assert bundle["arch"] == project.params()["model"]["arch"]
    assert bundle["classes"][0] == "airplane" and len(bundle["mean"]) == 3
    report = json.loads((project.path / "metrics/export.json").read_text())
    assert report["max_abs_diff_whole"] == 0 and report["max_abs_diff_state_dict"] == 0

    # The serving files agree with PyTorch within export.tolerance, as the stage measured in
    # a fresh process on its check batch, and here on a batch of another size.
    tolerance = project.params()["export"]["tolerance"]
    assert report["tolerance"] == tolerance and report["verified_images"] == 32
    assert 0 <= report["max_abs_diff_onnx"] <= tolerance and 0 <= report["max_abs_diff_pt2"] <= tolerance
    onnx_model = OnnxClassifier(project.path / "models/serving/model.onnx")
    pt2_model, pt2_meta = load_pt2(project.path / "models/serving/model.pt2")
    with torch.no_grad():
        expected = state_model(images)
        assert (pt2_model(images) - expected).abs().max() <= tolerance
    assert (torch.from_numpy(onnx_model(images)) - expected).abs().max() <= tolerance
    for meta in (onnx_model.metadata, pt2_meta):
        assert meta["classes"] == bundle["classes"] and meta["image_size"] == 32


def test_experiments_show_their_own_params_and_metrics(reproduced):
    project = reproduced
    project.dvc("exp", "run", "-n", "lr-small", "-S", "train.lr=0.005")
    project.dvc("exp", "run", "-n", "lr-big", "-S", "train.lr=0.05")
    rows = json.loads(project.dvc("exp", "show", "--json").stdout)
    exps = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev["data"]
                params = data["params"]["params.yaml"]["data"]
                metrics = data["metrics"]["metrics/eval.json"]["data"]
                train = data["metrics"]["metrics/train.json"]["data"]
                exps[rev["name"]] = (params["train"]["lr"], metrics["test_acc"], rev["rev"], train, metrics["test_loss"])
    assert exps.keys() >= {"lr-small", "lr-big"}
    assert exps["lr-small"][0] == 0.005 and exps["lr-big"][0] == 0.05
    # Accuracy and compute side by side: the same network and images, so the same PFLOP.
    compute = {name: (exps[name][3]["train_pflop"], exps[name][3]["gflop_per_image"]) for name in ("lr-small", "lr-big")}
    assert compute["lr-small"] == compute["lr-big"] and compute["lr-small"][0] > 0, compute
    assert 0 <= exps["lr-small"][3]["val_acc"] <= 1
    # Each row shows its own experiment's metrics: those committed in its own ref.
    for name in ("lr-small", "lr-big"):
        committed = json.loads(project.git("show", f"{exps[name][2]}:metrics/eval.json").stdout)
        assert exps[name][1] == committed["test_acc"], name
    # Two learning rates, two models: their test losses differ (their accuracies, on 50 images in
    # steps of 0.02, may coincide).
    assert exps["lr-small"][4] != exps["lr-big"][4]

    # tools/seed_summary.py: runs that differ only in train.seed form one row, mean ± std.
    project.dvc("exp", "run", "-n", "lr-small-seed1", "-S", "train.lr=0.005", "-S", "train.seed=1")
    show = project.path / "show.json"
    show.write_text(project.dvc("exp", "show", "--json").stdout)
    out = subprocess.run([sys.executable, str(ROOT / "tools/seed_summary.py"), "--json", str(show)],
                         capture_output=True, text=True, check=True).stdout
    revs = {rev["name"]: rev["rev"] for row in json.loads(show.read_text()) for exp in row.get("experiments") or []
            for rev in exp["revs"]}
    accs = [json.loads(project.git("show", f"{revs[name]}:metrics/eval.json").stdout)["test_acc"]
            for name in ("lr-small", "lr-small-seed1")]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2 ** 0.5  # the sample std of two values
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines()[2:]}
    assert set(rows) == {"train.lr=0.005", "train.lr=0.05"}, out
    assert rows["train.lr=0.005"][1:4] == ["2", "0, 1", f"{mean:.2%} ± {std:.2%}"], out
    assert rows["train.lr=0.05"][1:3] == ["1", "0"], out
    assert "±" not in rows["train.lr=0.05"][3], out  # one run: its value, no made-up spread

    # DVC refuses `-S train.lrr=0.1` itself (no such key); `+train.lrr` adds it, and then
    # the params schema fails the experiment, naming the key.
    refused = project.dvc("exp", "run", "-S", "train.lrr=0.1", check=False)
    assert refused.returncode != 0 and "train.lrr" in refused.stderr
    typo = project.dvc("exp", "run", "-S", "+train.lrr=0.1", check=False)
    assert typo.returncode != 0
    assert "unknown key 'train.lrr' (value 0.1)" in typo.stdout + typo.stderr


def test_push_and_pull_give_identical_models(reproduced, tmp_path):
    project = reproduced
    project.dvc("remote", "add", "-d", "local", str(tmp_path / "remote"))
    project.git("commit", "-qam", "a remote")
    project.dvc("push")
    clone = tmp_path / "clone"
    project.run("git", "clone", "-q", str(project.path), str(clone))
    subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=clone, env=run_env(), check=True, capture_output=True)
    for rel in ["models/model.pt", "models/model_state.pt", "models/trained.pt", "data/processed/train.pt"]:
        assert (clone / rel).read_bytes() == (project.path / rel).read_bytes(), rel
    # The clone is up to date: pulling the outputs is as good as running the pipeline.
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=run_env(),
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {}, status.stdout


def test_model_version_tag_with_gto(reproduced):
    project = reproduced
    gto = os.path.join(os.path.dirname(sys.executable), "gto")
    project.run(gto, "register", "classifier", "--version", "v1.0.0")
    assert "classifier@v1.0.0" in project.git("tag").stdout.split()
    shown = project.run(gto, "show", "classifier").stdout
    assert "v1.0.0" in shown


def test_diverging_training_fails_clearly(project):
    project.set_params(model={"arch": "seed_cnn"}, train={"lr": 50.0, "schedule": "constant", "weight_decay": 0.0})
    proc = project.dvc("repro", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite loss" in out and "epoch 1, step" in out, out
    assert "Traceback" not in out
    assert not (project.path / "models/trained.pt").exists()
    assert not (project.path / "models/model_state.pt").exists()


def test_interrupted_training_resumes_to_the_same_result(reproduced, tmp_path):
    project = reproduced  # its data is preprocessed
    project.set_params(train={"epochs": 12})
    # Interrupt like Ctrl-C as soon as the first checkpoint lands.
    ckpt = project.path / "checkpoints/train.pt"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project.path, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert ckpt.exists(), "training finished before it could be interrupted"
    assert not (project.path / "metrics/train.json").exists()
    done = torch.load(ckpt, weights_only=False)["epoch"] + 1
    assert 1 <= done < 12

    resumed = project.dvc("repro")
    assert f"resuming from checkpoints/train.pt: epoch {done} of 12 done" in resumed.stdout + resumed.stderr
    assert not ckpt.exists()
    resumed_metrics = (project.path / "metrics/train.json").read_text()
    resumed_curve = (project.path / "metrics/train_curve.csv").read_text()

    project.dvc("repro", "-f", "train")  # the same params from scratch, uninterrupted
    def losses(curve: str) -> list[list[str]]:  # drop the timing columns, which always differ
        return [row.split(",")[:6] for row in curve.splitlines()]

    assert losses((project.path / "metrics/train_curve.csv").read_text()) == losses(resumed_curve)
    fresh = json.loads((project.path / "metrics/train.json").read_text())
    again = json.loads(resumed_metrics)
    for key in ("train_loss", "train_acc", "val_acc"):
        assert fresh[key] == again[key], key


NEW_ARCH = '''"""A test's architecture: two linear layers, to show that a new file is the whole edit."""

from torch import nn

from ..registry import architecture


@architecture(meaning={"width": "hidden units"})
def two_layer_mlp(num_classes: int = 10, image_size: int = 32, width: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, width), nn.ReLU(),
                         nn.Linear(width, num_classes))
'''


def test_a_new_architecture_is_one_new_file(reproduced, tmp_path):
    """Adding an architecture: one file in imgclf/models/archs/ with one decorator, no other
    edit; `dvc exp run -S model.arch=<it>` trains it, exports it (ONNX and .pt2 too),
    evaluates it, and imgclf-predict classifies with it."""
    import cv2

    project = reproduced
    (project.path / "imgclf/models/archs/two_layer_mlp.py").write_text(NEW_ARCH)
    assert project.git("status", "--porcelain").stdout == "?? imgclf/models/archs/two_layer_mlp.py\n"
    # The project's own imgclf, as an editable install of this clone would import it.
    env = run_env() | {"PYTHONPATH": str(project.path)}
    dvc = [sys.executable, "-m", "dvc", "exp", "run", "-n", "mlp", "-S", "model.arch=two_layer_mlp",
           "-S", "model.width=32", "-S", "export.onnx=true", "-S", "export.pt2=true"]
    proc = subprocess.run(dvc, cwd=project.path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.ran_stages(proc) == ["params", "train", "export", "evaluate"], proc.stdout
    bundle = torch.load(project.path / "models/model_state.pt", weights_only=True)
    assert bundle["arch"] == "two_layer_mlp" and bundle["arch_args"]["width"] == 32
    assert 0 <= json.loads((project.path / "metrics/eval.json").read_text())["test_acc"] <= 1
    report = json.loads((project.path / "metrics/export.json").read_text())
    assert report["max_abs_diff_onnx"] <= report["tolerance"] and report["max_abs_diff_pt2"] <= report["tolerance"]

    images = torch.load(project.path / "data/processed/test.pt", weights_only=True)["images"][:2]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        assert cv2.imwrite(str(files[-1]), image.permute(1, 2, 0).numpy()[:, :, ::-1].copy())
    out = subprocess.run([sys.executable, "-m", "imgclf.serve.predict", "--json", *map(str, files)],
                         cwd=project.path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert len(results) == 2 and all(r["top"][0]["class"] in bundle["classes"] for r in results), out.stdout
