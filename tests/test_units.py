"""Unit checks of the pieces the stages are built from (no dvc, milliseconds each)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from imgclf.bench.feeders import tutorial_transform
from imgclf.core.errors import PipelineError
from imgclf.core.files import atomic_path, file_digest
from imgclf.core.params import ModelParams, Params, TrainParams, load_params
from imgclf.data.preprocess import channel_stats
from imgclf.download.fetch import fetch, local_path, source_name
from imgclf.models import registry as models
from imgclf.models.runtime import resolve_precision
from imgclf.recipes import flatten
from imgclf.train.augment import Augmenter
from imgclf.train.trainee import lr_factor


def augment_all(images: torch.Tensor, *, crop_padding: int, flip: bool, seed: int) -> torch.Tensor:
    """The augmentation of every image, in order (no permutation)."""
    augmenter = Augmenter(images, crop_padding=crop_padding, flip=flip)
    return augmenter(torch.arange(len(images)), torch.Generator().manual_seed(seed))

ROOT = Path(__file__).resolve().parents[1]


def test_classifier_normalisation_equals_the_tutorial_v2_pipeline():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    reference = torch.stack([tutorial_transform(mean, std)(img) for img in images])
    ours = models.Classifier(nn.Identity(), mean, std).normalize(images)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_channel_stats_match_a_direct_computation():
    images = torch.randint(0, 256, (5000, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = channel_stats(images)
    x = images.double() / 255
    # ToDtype(float32) rounds each pixel to float32 first: agreement to ~1e-8.
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)


def test_random_crop_is_a_shifted_window_of_the_reflect_padded_image():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_all(images, crop_padding=2, flip=False, seed=1)
    padded = nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    offsets = set()
    for img, pad in zip(out, padded):
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(pad[:, dy : dy + 8, dx : dx + 8], img)]
        assert found, "crop is not a window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 10  # offsets vary across the batch
    assert torch.equal(augment_all(images, crop_padding=0, flip=False, seed=0), images)


def test_random_flip_mirrors_about_half():
    images = torch.randint(0, 256, (400, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_all(images, crop_padding=0, flip=True, seed=0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) and not torch.equal(o, i) for o, i in zip(out, images)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | same).all()) and 150 < int(flipped.sum()) < 250


def test_augmentation_is_a_function_of_the_generator_seed():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment_all(images, crop_padding=2, flip=True, seed=5)
    b = augment_all(images, crop_padding=2, flip=True, seed=5)
    assert torch.equal(a, b)
    other = augment_all(images, crop_padding=2, flip=True, seed=6)
    changed = sum(not torch.equal(x, y) for x, y in zip(a, other, strict=True))
    assert changed > len(images) // 2  # another seed, other crops and flips for most images


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "linear", "constant"])
def test_schedules_start_low_and_end_at_zero(schedule):
    train_params = TrainParams(schedule=schedule, warmup_epochs=1)
    total, per_epoch = 1000, 100
    factors = [lr_factor(train_params, s, total, per_epoch) for s in range(total + 1)]
    assert max(factors) == pytest.approx(1.0, abs=0.01)
    if schedule == "constant":
        assert set(factors) == {1.0}
    else:
        assert factors[0] <= 0.01 and factors[-1] == pytest.approx(0.0, abs=1e-9)


def test_onecycle_takes_airbench94s_start_peak_and_end():
    total, per_epoch = 1000, 100
    default = [lr_factor(TrainParams(), s, total, per_epoch) for s in (0, 125, 250, 625, 1000)]
    assert default == [0.0, 0.5, 1.0, 0.5, 0.0]  # the triangle, unchanged
    airbench = TrainParams(onecycle_start=0.2, onecycle_peak=0.23, onecycle_end=0.07)
    factors = [lr_factor(airbench, s, total, per_epoch) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.2) and factors[230] == 1.0 and factors[-1] == pytest.approx(0.07)
    assert max(factors) == 1.0 and factors.index(1.0) == 230
    assert factors[115] == pytest.approx(0.6) and factors[615] == pytest.approx(0.535)  # linear both ways


def test_seed_cnn_is_the_tutorials_network():
    net = models.ARCHS["seed_cnn"].build()
    assert list(dict(net.named_children())) == [
        "conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "flatten", "full_connect1", "full_connect2"]
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid, nn.BatchNorm2d)) for m in net.modules())
    assert (net.conv1.in_channels, net.conv1.out_channels, net.conv1.kernel_size, net.conv1.padding) == (3, 32, (5, 5), (2, 2))
    assert (net.full_connect1.in_features, net.full_connect2.out_features) == (1024, 10)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["seed_cnn_bn", "resnet_fast"])
@pytest.mark.parametrize("size,classes", [(32, 10), (48, 3)])
def test_models_take_any_size_and_class_count(arch, size, classes):
    args = models.arch_args(ModelParams(arch=arch, width=8), num_classes=classes, image_size=size)
    m = models.build(arch, args, [0.5] * 3, [0.2] * 3)
    assert m(torch.zeros(2, 3, size, size, dtype=torch.uint8)).shape == (2, classes)


def test_vgg16_head_is_replaced_for_the_class_count():
    m = models.ARCHS["vgg16"].build(num_classes=7)
    assert isinstance(m.classifier[6], nn.Linear) and m.classifier[6].out_features == 7
    assert m.classifier[6].in_features == 4096
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_fp16_is_refused_on_cpu():
    with pytest.raises(PipelineError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")) is None


def test_committed_params_are_valid_and_dvc_yaml_declares_known_keys():
    from dvc.utils.serialize import parse_yaml

    params = load_params(ROOT / "params.yaml")
    # Every value written in the file is the value the stages use: same value, same type (an
    # int literal is allowed where the schema takes a float), nothing dropped or coerced.
    written = flatten(parse_yaml((ROOT / "params.yaml").read_text(), "params.yaml"))
    used = flatten(params.model_dump())
    assert written.keys() <= used.keys()
    for key, value in written.items():
        assert used[key] == value, key
        assert type(used[key]) is type(value) or (type(used[key]), type(value)) == (float, int), key

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # The params stage alone declares the whole file (so a misspelt section fails `dvc repro`)
    # and writes nothing, so nothing depends on it and it reruns no other stage.
    whole = [name for name, st in stages.items() for k in st.get("params", []) if k == {"params.yaml": None}]
    assert whole == ["params"] and "outs" not in stages["params"] and "metrics" not in stages["params"]
    seen = set()
    produced = {next(iter(o)) if isinstance(o, dict) else o for st in stages.values() for o in st.get("outs", [])}
    for name, stage in stages.items():
        for key in stage.get("params", []):
            if name == "params":
                continue
            section, _, field = key.partition(".")
            assert section in Params.model_fields, f"{name}: unknown params section {section}"
            if field:
                model = Params.model_fields[section].annotation
                assert field in model.model_fields, f"{name}: unknown params key {key}"
                seen.add(key)
            else:
                seen.update(f"{section}.{f}" for f in Params.model_fields[section].annotation.model_fields)
        for dep in stage.get("deps", []):
            assert dep in produced or (ROOT / dep).exists(), f"{name}: declared dependency {dep} does not exist"
            if dep.endswith(".py") and dep.startswith("stages/"):
                assert dep == f"stages/{name}.py", f"{name}: depends on another stage's script {dep}"
    every_key = {f"{s}.{f}" for s, fi in Params.model_fields.items() for f in fi.annotation.model_fields}
    assert seen == every_key, f"params no stage reads: {every_key - seen}"


@pytest.mark.parametrize("text,message", [
    ("train:\n  epochs: true\n", "train.epochs = True: must be a whole number"),
    ("train:\n  epochs: '3'\n", "train.epochs = '3': must be a whole number"),
    ("train:\n  augment:\n    flip: 'off'\n", "train.augment.flip = 'off': must be true, false or alternate"),
    ("train:\n  augment:\n    flip: off\n", "train.augment.flip = 'off': must be true, false or alternate"),  # YAML 1.2, as DVC
    ("train:\n  warmup_epochs: .inf\n", "train.warmup_epochs = inf: must be a finite number"),
    ("train:\n  lr: .nan\n", "train.lr = nan: must be a finite number"),
    ("export:\n  tta_flip: 1\n", "export.tta_flip = 1: must be true or false"),
    ("trian:\n  lr: 0.1\n", "unknown section 'trian' (value {'lr': 0.1}); the keys of the top level are: download,"),
    ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "params.yaml, line 4: key 'lr' is given twice in the mapping that starts at line 2"),
    ("train:\n  lr: [0.1\n", "params.yaml, line 3: not valid YAML"),
])
def test_params_refuse_what_would_crash_or_be_coerced(tmp_path, text, message):
    from imgclf.core.params import ParamsError

    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as e:
        load_params(tmp_path / "params.yaml")
    assert message in str(e.value)


def test_params_read_numbers_as_dvc_does(tmp_path):
    """An int is a float (lr: 1) and 1e-3 is a number: the values DVC records in dvc.lock."""
    from dvc.utils.serialize import parse_yaml

    text = "train:\n  lr: 1\n  weight_decay: 1e-3\n  warmup_epochs: 010\n  augment:\n    flip: false\n"
    (tmp_path / "params.yaml").write_text(text)
    train_params = load_params(tmp_path / "params.yaml").train
    dvc = parse_yaml(text, "params.yaml")["train"]
    assert (train_params.lr, train_params.weight_decay, train_params.warmup_epochs, train_params.augment.flip) == (1.0, 0.001, 10.0, False)
    assert (dvc["lr"], dvc["weight_decay"], dvc["warmup_epochs"], dvc["augment"]["flip"]) == (1, 0.001, 10, False)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_path_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the fsyncs a power cut can leave a renamed file whose data never reached the
    disk: a truncated checkpoint (issue 9)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b)))
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert Path(events[0][1]).name.startswith(".out.bin.tmp-") and events[2][1] == str(tmp_path)

    events.clear()
    with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.pt").write_bytes(b"a")
        (tmp / "sub/b.pt").write_bytes(b"b")
    synced = {Path(p).name for kind, p in events[:-2] if kind == "fsync"}
    assert {"a.pt", "b.pt", "sub"} <= synced and events[-2:] == [("rename", str(tmp_path / "folder")), ("fsync", str(tmp_path))]


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EFBIG", "EROFS"])
def test_a_refused_write_names_the_output_and_leaves_the_old_one(tmp_path, errno_name):
    import errno

    from imgclf.core.errors import OutputError

    target = tmp_path / "models/model.pt"
    target.parent.mkdir()
    target.write_bytes(b"previous export")
    code = getattr(errno, errno_name)
    with pytest.raises(OutputError, match=rf"^cannot write {target}: .* \({errno_name}\)"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(code, os.strerror(code))  # what a failed write() raises: no file name
    assert target.read_bytes() == b"previous export" and list(target.parent.iterdir()) == [target]
    # A folder output: the file inside that failed is named too.
    with pytest.raises(OutputError, match=rf"^cannot write {tmp_path / 'cache'}: meta.json: .*\({errno_name}\)"):
        with atomic_path(tmp_path / "cache", is_dir=True) as tmp:
            with atomic_path(tmp / "meta.json") as inner:
                raise OSError(code, os.strerror(code), str(inner))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    # An error reading some other file inside the block is not the output's: it passes unchanged.
    with pytest.raises(FileNotFoundError):
        with atomic_path(target) as tmp:
            open(tmp_path / "missing-input")
    # A file where the output's folder should be.
    with pytest.raises(OutputError, match=rf"cannot write {target}/x.json: {target} is a file, not a folder"):
        with atomic_path(target / "x.json"):
            pass


def test_a_failed_torch_save_names_the_file_it_was_writing(tmp_path):
    """torch's writers report a failed write as a RuntimeError; written through save_torch (a
    file object), it is the OSError it was. With two outputs open (as export holds both), the
    error names the one being written, and the cause; no error text is read."""
    import resource
    import subprocess
    import sys

    code = """if True:
        import sys, torch
        from pathlib import Path
        from imgclf.core.errors import OutputError
        from imgclf.core.files import atomic_path, save_torch
        d = Path(sys.argv[1])
        for first, second in [(50_000, 100_000), (100_000, 10)]:  # floats: 200 kB, then 400 kB
            try:
                with atomic_path(d / "a.pt") as a, atomic_path(d / "b.pt") as b:
                    save_torch(torch.zeros(first), a)
                    save_torch(torch.zeros(second), b)
            except OutputError as e:
                print(e)
        print(sorted(p.name for p in d.iterdir()))
    """
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))  # noqa: E731
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], preexec_fn=limit, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    efbig = "File too large (EFBIG): this process may not write files over 300000 bytes (ulimit -f)"
    assert proc.stdout.splitlines() == [f"cannot write {tmp_path}/b.pt: {efbig}", f"cannot write {tmp_path}/a.pt: {efbig}", "[]"]


def test_a_stage_prints_an_os_error_as_one_line(tmp_path, capsys):
    from imgclf.core.stage import report_failures

    missing = tmp_path / "data/processed/train.pt"
    with pytest.raises(SystemExit) as e:
        report_failures("train", lambda: open(missing, "rb"))
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error (train): {missing}: No such file or directory (ENOENT)\n"


def test_sources_resolve_to_paths_and_names(tmp_path):
    assert local_path("https://example.invalid/a.tar.gz") is None
    assert local_path((tmp_path / "x y.tgz").as_uri()) == tmp_path / "x y.tgz"
    assert source_name("https://example.invalid/dir/cifar-10-python.tar.gz") == "cifar-10-python.tar.gz"
    (tmp_path / "photos").mkdir()
    assert source_name(str(tmp_path / "photos")) == "photos.tar"
    with pytest.raises(PipelineError, match="unsupported scheme"):
        local_path("ftp://example.invalid/x")


def test_a_folder_packs_to_identical_bytes_each_time(tmp_path):
    src = tmp_path / "photos"
    for rel in ["train/cat/a.jpg", "train/dog/b.jpg", "test/cat/c.jpg"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    a = fetch(str(src), tmp_path / "raw1", md5="")
    (src / "train/cat/a.jpg").touch()  # a new mtime alone changes nothing
    b = fetch(str(src), tmp_path / "raw2", md5="")
    assert a.name == "photos.tar" and file_digest(a) == file_digest(b)
    with pytest.raises(PipelineError, match="folder"):
        fetch(str(src), tmp_path / "raw3", md5="0" * 32)
    assert not (tmp_path / "raw3").exists()


def _module_file(dotted: str) -> Path | None:
    """The file of an imgclf module (``imgclf.core.params``), or None if it names no module
    (an attribute of one: ``imgclf.core.params.load_params``)."""
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imgclf_imports(path: Path) -> set[Path]:
    """Files of the imgclf modules a file imports (at any depth of the file, lazy imports
    included), with the ``__init__.py`` of every package on the way."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])  # imgclf.serve for imgclf/serve/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
            found |= {f for m in mods if m.startswith("imgclf.") for f in _package_files(m)}
            continue
        else:
            continue
        if mod != "imgclf" and not mod.startswith("imgclf."):
            continue
        found |= _package_files(mod)
        found |= {f for a in node.names for f in _package_files(f"{mod}.{a.name}")}  # from pkg import module
    return found


def _package_files(dotted: str) -> set[Path]:
    """The module's file and the ``__init__.py`` of each package above it."""
    parts = dotted.split(".")
    return {f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i]))) is not None}


def test_each_stage_declares_exactly_the_code_folders_it_runs():
    """Code is declared by folder (imgclf/<subpackage>): a stage's whole import closure lies in
    the folders it declares, and it declares no folder its closure does not reach."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = ROOT / f"stages/{name}.py"
        assert f"stages/{name}.py" in stage["deps"], name
        needed, todo = set(), [script]
        while todo:
            for file in _imgclf_imports(todo.pop()) - needed:
                needed.add(file)
                todo.append(file)
        # imgclf/__init__.py holds a docstring only: it must import nothing, or every stage
        # would run (and have to declare) what it imports.
        assert _imgclf_imports(ROOT / "imgclf/__init__.py") == set()
        reached = {"imgclf/" + f.relative_to(ROOT / "imgclf").parts[0] for f in needed if f.parent != ROOT / "imgclf"}
        declared = {d for d in stage["deps"] if d.startswith("imgclf")}
        assert all((ROOT / d).is_dir() for d in declared), f"{name}: declare folders, not files: {sorted(declared)}"
        assert declared == reached, f"{name}: missing {reached - declared}, extra {declared - reached}"


def test_dvc_yaml_declares_the_paths_and_sections_each_stage_is_given():
    """Paths are declared once, in imgclf/core/paths.py; dvc.yaml names the same ones, each as
    the same kind (dep, out, metric, or a plot file kept in git), and the params sections the
    runner hands each stage (imgclf.core.params.STAGE_SECTIONS)."""
    from imgclf.core import paths
    from imgclf.core.params import STAGE_SECTIONS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(paths.STAGES) == set(STAGE_SECTIONS)

    def names(entries):
        return {next(iter(e)) if isinstance(e, dict) else e for e in entries}

    for name, stage in stages.items():
        given = paths.STAGES[name]
        data_deps = {d for d in stage.get("deps", []) if not d.startswith(("stages/", "imgclf/"))}
        assert data_deps == paths.declared(given, "dep"), name
        outs = stage.get("outs", [])
        kept_in_git = {next(iter(o)) for o in outs if isinstance(o, dict) and next(iter(o.values())).get("cache") is False}
        assert names(outs) - kept_in_git == paths.declared(given, "out"), name
        assert kept_in_git == paths.declared(given, "plot"), name
        assert names(stage.get("metrics", [])) == paths.declared(given, "metric"), name
        local = paths.declared(given, "local")
        assert not local & (names(outs) | names(stage.get("metrics", []))), name
        if name != "params":
            assert stage["params"] == list(STAGE_SECTIONS[name]), name
        # Every stage script is the runner and its stage's run(section, paths): a few lines.
        script = (ROOT / f"stages/{name}.py").read_text()
        code = script.splitlines()[ast.parse(script).body[0].end_lineno:]  # after the docstring
        assert f'run_stage("{name}", ' in script and len([line for line in code if line.strip()]) <= 5, name


def test_params_yaml_comments_and_docs_params_md_are_generated_from_the_schema(tmp_path):
    """Each param is described once, in the schema: params.yaml's comments and docs/params.md
    are what tools/params_doc.py makes of it, and an edit to either alone is caught."""
    import subprocess
    import sys

    tool = [sys.executable, str(ROOT / "tools/params_doc.py"), "--check"]
    proc = subprocess.run([*tool, "--root", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/params.md").write_text((ROOT / "docs/params.md").read_text())
    edited = (ROOT / "params.yaml").read_text().replace("# peak learning rate", "# the learning rate, hand-edited")
    assert edited != (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(edited)
    proc = subprocess.run([*tool, "--root", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and f"{tmp_path / 'params.yaml'} is stale" in proc.stderr
    assert "+  lr: 0.05                  # peak learning rate" in proc.stderr
    # Values are the user's: a changed value is kept, with its comment.
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("lr: 0.05 ", "lr: 0.07 "))
    assert subprocess.run([*tool, "--root", str(tmp_path)], capture_output=True).returncode == 0


def test_subpackages_import_each_other_without_cycles():
    """The subpackages form layers (core at the bottom): no two import each other, directly
    or round a longer loop."""
    graph: dict[str, set[str]] = {}
    for file in (ROOT / "imgclf").rglob("*.py"):
        rel = file.relative_to(ROOT / "imgclf")
        if len(rel.parts) < 2:
            continue
        own = rel.parts[0]
        graph.setdefault(own, set()).update(
            f.relative_to(ROOT / "imgclf").parts[0] for f in _imgclf_imports(file)
            if f.parent != ROOT / "imgclf" and f.relative_to(ROOT / "imgclf").parts[0] != own)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        for other in sorted(graph.get(node, ())):
            visit(other, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_transforms_v1_and_v2_agree_and_v2_takes_batches():
    """The tutorial's TODO §2.5 (v1 vs v2), as checked facts: the same numbers per image,
    and v2 (unlike v1's ToTensor) also transforms a whole uint8 batch at once."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as v1
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    old = v1.Compose([v1.ToTensor(), v1.Normalize(mean, std)])(Image.fromarray(hwc))
    new = tutorial_transform(mean, std)(Image.fromarray(hwc))
    torch.testing.assert_close(new, old)
    batch = torch.from_numpy(np.stack([hwc] * 4)).permute(0, 3, 1, 2)  # N, C, H, W uint8
    out = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(batch)
    assert out.shape == (4, 3, 8, 8)
    torch.testing.assert_close(out[2], old)


def test_test_time_views():
    from imgclf.models.tta import TestTimeAugmented, shift, with_tta

    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).reshape(2, 3, 6, 6)
    moved = shift(images, 1, 1)
    assert torch.equal(moved[..., 1:, 1:], images[..., :-1, :-1])  # content moves down-right
    assert torch.equal(shift(images, -2, -2)[..., :-2, :-2], images[..., 2:, 2:])
    assert torch.equal(shift(images, 0, 0), images)

    class Probe(nn.Module):  # logits = mean pixel of the left and right halves
        def forward(self, x):
            x = x.float()
            return torch.stack([x[..., :3].mean((1, 2, 3)), x[..., 3:].mean((1, 2, 3))], 1)

    probe = Probe()
    assert with_tta(probe, {"flip": False, "shift": 0}) is probe and with_tta(probe, None) is probe
    plain = probe(images)
    flipped = with_tta(probe, {"flip": True, "shift": 0})(images)
    torch.testing.assert_close(flipped[:, 0], flipped[:, 1])  # mirror views average the halves
    assert not torch.allclose(plain[:, 0], plain[:, 1])
    shifted = TestTimeAugmented(probe, flip=False, shift=1)(images)
    expected = sum(probe(shift(images, d, d)) for d in (0, 1, -1)) / 3
    torch.testing.assert_close(shifted, expected)
    both = TestTimeAugmented(probe, flip=True, shift=1)(images)  # 6 views: 3 shifts x (image, mirror)
    expected = sum(probe(v) for d in (0, 1, -1) for v in (shift(images, d, d), shift(images, d, d).flip(-1))) / 6
    torch.testing.assert_close(both, expected)
    # export.tta_center_weight 2, airbench94's weights: half on the unshifted pair, a quarter on each shifted pair.
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    both = TestTimeAugmented(probe, flip=True, shift=1)(images)
    weighted = with_tta(probe, {"flip": True, "shift": 1, "center_weight": 2.0})(images)

    def mirrored(x):
        return 0.5 * probe(x) + 0.5 * probe(x.flip(-1))

    expected = 0.5 * mirrored(images) + 0.25 * mirrored(shift(images, 1, 1)) + 0.25 * mirrored(shift(images, -1, -1))
    torch.testing.assert_close(weighted, expected)
    assert not torch.allclose(weighted, both)


def test_more_training_processes_than_cores_is_warned_about():
    """`train.processes=8` on a 2-core machine starts 8 processes that share 2 cores: the
    launcher says so, naming the count and the limit."""
    from imgclf.train.launch import oversubscribed

    cores = len(os.sched_getaffinity(0))
    warning = oversubscribed(TrainParams(processes=cores + 6, device="cpu"))
    assert warning == (f"train.processes = {cores + 6} on a node with {cores} CPU cores (cpu): the processes share "
                       f"them, which is slower than {cores} process{'es' if cores > 1 else ''}; "
                       f"set train.processes to at most {cores}")
    assert oversubscribed(TrainParams(processes=cores, device="cpu")) is None


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="train.keep_memory sets glibc's malloc")
def test_keep_memory_stops_each_step_faulting_in_its_activations_afresh():
    """train.keep_memory: blocks over 32 MB (a step's activations) freed and allocated again are
    reused once the heap has settled, not unmapped and faulted in page by page every step (what
    made a step slower); the heap settles within about one step's memory of the peak."""
    import subprocess
    import sys

    code = """
import resource, sys, torch
from imgclf.models.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # a step's activations: blocks over 32 MB, all freed at its end (152 MB here)
    blocks = [torch.empty(n * 2**20).fill_(1.0) for n in (16, 12, 10)]
for _ in range(5):  # the heap settles: a new block fits in what earlier steps freed
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_minflt - before, usage.ru_maxrss // 1024)
"""
    faults, peak_mb = {}, {}
    for mode in ("plain", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        faults[mode], peak_mb[mode] = map(int, out.stdout.split()[-2:])
    assert faults["plain"] > 10 * 5000, faults  # 38,912 pages of 4 kB a step without it (fewer with huge pages)
    assert faults["keep"] < 1000, faults
    assert peak_mb["keep"] < peak_mb["plain"] + 2 * 152, peak_mb
