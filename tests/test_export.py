"""The serving files (ONNX, torch.export): every architecture exports, a format can be turned
off in a real `dvc repro`, and a file that disagrees with PyTorch stops the stage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

from imgclf.core.errors import PipelineError
from imgclf.core.params import ModelParams
from imgclf.models import registry as models
from imgclf.models.bundle import make_bundle
from imgclf.serve import serving
from imgclf.serve.export import check_agreement

CLASSES = ["ant", "bee", "cat"]
TOLERANCE = 1e-3  # export.tolerance's default


def small_model(arch: str, size: int) -> tuple[models.Classifier, dict]:
    """An untrained ``arch`` as the export stage sees it, narrowed where that keeps tests fast."""
    torch.manual_seed(0)
    args = models.arch_args(ModelParams(arch=arch, width=8), num_classes=len(CLASSES), image_size=size)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = models.build(arch, args, mean, std)
    if arch == "vgg16":
        # Full width it makes 0.54 GB files. The same layers (13 convolutions in VGG16's
        # layout, max pools, adaptive pooling, the dropout classifier) at 1/8 of the channels
        # and a 16-wide classifier keep every op of the graph.
        from torchvision.models.vgg import cfgs, make_layers

        model.net.features = make_layers([c if c == "M" else c // 8 for c in cfgs["D"]])
        hidden = 16
        model.net.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(True),
            nn.Dropout(), nn.Linear(hidden, len(CLASSES)),
        )
    model.eval()
    for m in model.modules():  # batch norm with non-trivial statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    bundle = make_bundle(model, arch=arch, arch_args=args, classes=CLASSES, mean=mean, std=std, image_size=size)
    return model, bundle


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_every_architecture_exports_to_both_formats(arch, tmp_path):
    size = 32
    model, bundle = small_model(arch, size)
    meta = serving.metadata(bundle)
    assert serving.write(model, tmp_path, serving.FORMATS, meta) == {
        "onnx": tmp_path / "model.onnx", "pt2": tmp_path / "model.pt2"}

    onnx_model = serving.OnnxClassifier(tmp_path / "model.onnx", threads=1)
    pt2_model, pt2_meta = serving.load_pt2(tmp_path / "model.pt2")
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # the batch dimension is dynamic in both files
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            expected = model(images)
            got_pt2 = pt2_model(images)
        got_onnx = torch.from_numpy(onnx_model(images))
        assert got_onnx.shape == got_pt2.shape == (batch, len(CLASSES))
        assert (got_onnx - expected).abs().max().item() <= TOLERANCE, arch
        assert (got_pt2 - expected).abs().max().item() <= TOLERANCE, arch

    # What a serving stack needs to feed the model and name its outputs travels in the files.
    for m in (onnx_model.metadata, pt2_meta):
        assert m["classes"] == CLASSES and m["image_size"] == size and m["arch"] == arch
        assert m["mean"] == [0.5, 0.4, 0.3] and m["std"] == [0.2, 0.25, 0.3]
    graph = onnx.load(tmp_path / "model.onnx").graph
    (inp,) = graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, size, size]


def test_a_disagreeing_file_stops_the_export_naming_it():
    expected = torch.randn(4, 3)
    close = {"whole": expected.clone(), "state": expected.clone(), "onnx": expected + 1e-6, "pt2": expected.clone()}
    diffs = check_agreement(expected, close, TOLERANCE)
    assert diffs["pt2"] == 0 and 0 < diffs["onnx"] < 1e-5
    with pytest.raises(PipelineError, match=r"the onnx file \(max \|logit diff\| 0\.01\) disagrees with PyTorch "
                                            r"beyond export.tolerance = 0\.001"):
        check_agreement(expected, {**close, "onnx": expected + 0.01}, TOLERANCE)
    with pytest.raises(PipelineError, match="pt2 file"):
        check_agreement(expected, {**close, "pt2": torch.full_like(expected, float("nan"))}, TOLERANCE)
    with pytest.raises(PipelineError, match="reloaded models disagree"):  # the PyTorch files: exactly
        check_agreement(expected, {**close, "state": expected + 1e-6}, TOLERANCE)


def test_a_format_turned_off_is_not_written_and_dvc_is_content(reproduced):
    """models/serving is one declared folder: a format turned off is simply absent from it,
    where a declared file that is not written would fail `dvc repro`."""
    project = reproduced
    # That run exported with both formats off, as the end of this test does: without its run
    # cache, DVC reruns the export then, rather than restoring that run's outputs.
    shutil.rmtree(project.path / ".dvc/cache/runs")
    serving_dir = project.path / "models/serving"
    project.set_params(export={"onnx": False, "pt2": True})
    assert project.ran_stages(project.dvc("repro")) == ["params", "export"]
    assert sorted(p.name for p in serving_dir.iterdir()) == ["model.pt2"]
    report = json.loads((project.path / "metrics/export.json").read_text())
    assert "max_abs_diff_onnx" not in report and report["max_abs_diff_pt2"] <= report["tolerance"]
    assert json.loads(project.dvc("status", "--json").stdout) == {}

    project.set_params(export={"pt2": False})
    assert project.ran_stages(project.dvc("repro")) == ["params", "export"]  # the params stage checks every change
    assert serving_dir.is_dir() and list(serving_dir.iterdir()) == []  # the old model.pt2 is gone
    report = json.loads((project.path / "metrics/export.json").read_text())
    assert not any(k.endswith(("_onnx", "_pt2")) for k in report) and report["max_abs_diff_state_dict"] == 0
    assert json.loads(project.dvc("status", "--json").stdout) == {}


def test_the_export_check_names_a_temporary_folder_it_cannot_use(tmp_path, monkeypatch):
    """The fresh-process check writes its images to a temporary folder: a missing folder or a
    full disk there is one line naming it, not a traceback."""
    import tempfile

    from imgclf.serve.export import verify_in_fresh_process

    images = torch.zeros(32, 3, 32, 32, dtype=torch.uint8)  # 98 KB
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    with pytest.raises(PipelineError, match=r"^cannot make the export check's temporary folder in .*/file: .*TMPDIR"):
        verify_in_fresh_process({}, images)
    # A file-size limit (like a full disk) while torch.save writes the images.
    code = ("import resource, torch; from imgclf.serve.export import verify_in_fresh_process; "
            "from imgclf.core.errors import PipelineError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))\n"
            "try:\n    verify_in_fresh_process({}, torch.zeros(32, 3, 32, 32, dtype=torch.uint8))\n"
            "except PipelineError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert re.match(r"cannot write the export check's images to \S+/in.pt: .* \(is \S+ full\? set TMPDIR", proc.stdout), proc.stdout


def test_the_export_check_runs_the_same_imgclf_as_the_export(tmp_path):
    """The fresh process is isolated (python -I ignores PYTHONPATH), yet it must import the
    imgclf that exports, also when that is a checkout on PYTHONPATH and not an installed
    package (a GPU machine given the project as a folder): here a copy of the package that
    logs every import of itself."""
    import os
    import shutil
    from pathlib import Path

    import imgclf

    checkout = tmp_path / "checkout"
    shutil.copytree(Path(imgclf.__file__).parent, checkout / "imgclf", ignore=shutil.ignore_patterns("__pycache__"))
    with open(checkout / "imgclf" / "__init__.py", "a") as f:
        f.write("\nimport os as _os\nwith open(_os.environ['IMGCLF_IMPORT_LOG'], 'a') as _f:\n    _f.write(__file__ + '\\n')\n")
    log = tmp_path / "imports.log"
    code = ("import torch; from imgclf.serve.export import verify_in_fresh_process; "
            "verify_in_fresh_process({}, torch.zeros(1, 3, 8, 8, dtype=torch.uint8))")
    env = dict(os.environ, PYTHONPATH=str(checkout), IMGCLF_IMPORT_LOG=str(log))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Imported twice, both times from the copy: by the exporting process and by the fresh one.
    assert log.read_text().splitlines() == [str(checkout / "imgclf" / "__init__.py")] * 2


def test_an_exporter_failure_names_its_innermost_cause(tmp_path, monkeypatch):
    """The ONNX exporter wraps the real error in one that says only which of its steps failed
    (and colours it): the one line names both, without the escapes."""
    model, bundle = small_model("seed_cnn", 32)

    def failing_export(*args, **kwargs):
        try:
            raise TypeError("no translation for aten::frobnicate")
        except TypeError as e:
            raise RuntimeError("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m. Next steps:\n...") from e

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(PipelineError) as info:
        serving.write(model, tmp_path, ["onnx"], serving.metadata(bundle))
    assert str(info.value) == (
        "cannot export model.arch=seed_cnn to ONNX (RuntimeError: Failed to convert the exported program to an ONNX "
        "model. This is step 3/3. Next steps:; caused by TypeError: no translation for aten::frobnicate); "
        "set export.onnx=false to skip this format")


# Where each module's classes were, in the two layouts before this one: flat (one imgclf/
# folder), then one subpackage per stage with the architectures inside models/registry.py
# and models/whitened.py. Pickle protocol 2 names a class as "module\nname\n".
OLD_LAYOUTS = {
    "flat": {b"imgclf.models.registry\n": b"imgclf.models\n", b"imgclf.models.layers\n": b"imgclf.models\n",
             b"imgclf.models.archs.resnet_fast\n": b"imgclf.models\n",
             b"imgclf.models.archs.whitened_net\n": b"imgclf.whitened\n", b"imgclf.models.tta\n": b"imgclf.tta\n"},
    "subpackages": {b"imgclf.models.archs.resnet_fast\n": b"imgclf.models.registry\n",
                    b"imgclf.models.archs.whitened_net\n": b"imgclf.models.whitened\n"},
}


@pytest.mark.parametrize("layout", OLD_LAYOUTS)
@pytest.mark.parametrize("arch", ["resnet_fast", "whitened_net"])
def test_a_whole_model_pickled_in_an_earlier_layout_still_loads(tmp_path, arch, layout):
    """A whole-model file names each class by its module. Files written in an earlier layout
    name modules that are now packages or gone; the loader maps them to where the classes
    live now (imgclf.models.bundle.MOVED_MODULES)."""
    import zipfile

    from imgclf.models.bundle import load_whole_model
    from imgclf.models.tta import with_tta

    model = with_tta(small_model(arch, 16)[0], {"flip": True, "shift": 1}).eval()
    new = tmp_path / "new.pt"
    torch.save(model, new)
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                renamed = [a for a in OLD_LAYOUTS[layout] if a in data]
                for a in renamed:
                    data = data.replace(a, OLD_LAYOUTS[layout][a])
                assert renamed and b"imgclf.models.archs" not in data
            dst.writestr(info, data)
    with pytest.raises((ImportError, AttributeError)):  # plain unpickling: no such module, or no such class in it
        torch.load(old, weights_only=False)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    loaded = load_whole_model(old)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
