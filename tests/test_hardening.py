"""Issue 22's second hardening pass, the cases that need no memory measurement (test_bombs has
those) and no trained project (test_faults): each asserts the one line a user now sees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from imgclf.cache.dataset import load_cache
from imgclf.core.errors import PipelineError
from imgclf.core.params import PreprocessParams
from imgclf.data.archive import Limits
from imgclf.data.imagefolder import read_archive
from imgclf.data.preprocess import preprocess
from imgclf.download.fetch import fetch
from imgclf.serve.predict import format_text, main

from helpers import ROOT, make_tar, run_env, save_state_bundle, save_whole_model


def png(value: int) -> bytes:
    return cv2.imencode(".png", np.full((8, 8, 3), value, np.uint8))[1].tobytes()


def folder_members(classes=("a", "b"), per_class: int = 2) -> dict[str, bytes]:
    return {f"{split}/{c}/{i}.png": png(40 + 60 * k) for split in ("train", "test")
            for k, c in enumerate(classes) for i in range(per_class)}


# --- 1. memory that follows the images ---------------------------------------------------------

def test_the_member_count_of_a_tar_is_capped(tmp_path):
    archive = make_tar(tmp_path / "d.tar.gz", {**folder_members(), **{f"x/{i}": b"" for i in range(20)}})
    with pytest.raises(PipelineError, match=r"holds more than 10 members, over the limit of 10 \(preprocess.max_members\), "
                                            r"reached at member 'x/2'"):
        read_archive(archive, image_size=8, limits=Limits(member_bytes=10**6, total_bytes=10**9, members=10))


def test_a_cache_that_cannot_fit_is_refused_before_any_decode(tmp_path):
    from imgclf.data.budget import CacheBudget

    archive = make_tar(tmp_path / "d.tar", folder_members(per_class=50), "w")  # 200 images of 224 px: 30 MB
    budget = CacheBudget(image_size=224, memory=20 * 10**6, memory_source="MemAvailable in /proc/meminfo",
                         disk=10**12, out_dir="data/processed")
    with pytest.raises(PipelineError) as e:
        read_archive(archive, image_size=224, budget=budget)
    assert str(e.value) == (
        "preprocess.image_size = 224: a cache of 200 images needs 0.0 GB (200 x 224 x 224 x 3 bytes), more than the "
        "0.0 GB of memory available (MemAvailable in /proc/meminfo); lower preprocess.image_size or use fewer images; "
        "nothing was written")
    full = CacheBudget(image_size=224, memory=10**12, memory_source="", disk=10**6, out_dir="data/processed")
    with pytest.raises(PipelineError, match="more than the 0.0 GB free on the disk of data/processed"):
        read_archive(archive, image_size=224, budget=full)



def test_empty_members_do_not_count_towards_the_cache_estimate(tmp_path):
    # 40 empty members beside 8 images: 8 slots of 224 px (1.2 MB) fit where 48 (7.2 MB) would not.
    from imgclf.data.budget import CacheBudget

    members = {**folder_members(), **{f"train/a/e{i:02d}.png": b"" for i in range(40)}}
    archive = make_tar(tmp_path / "d.tar.gz", members)
    budget = CacheBudget(image_size=224, memory=2 * 10**6, memory_source="MemAvailable in /proc/meminfo",
                         disk=10**12, out_dir="data/processed")
    raw = read_archive(archive, image_size=224, bad_images="skip", budget=budget)
    assert (len(raw.train), len(raw.test)) == (4, 4)
    tight = CacheBudget(image_size=224, memory=10**6, memory_source="MemAvailable in /proc/meminfo",
                        disk=10**12, out_dir="data/processed")
    with pytest.raises(PipelineError, match=r"a cache of 8 images needs"):
        read_archive(archive, image_size=224, bad_images="skip", budget=tight)

# --- 4. data that cannot train honestly --------------------------------------------------------

def test_a_single_class_dataset_is_refused(tmp_path):
    archive = make_tar(tmp_path / "one.tar", folder_members(classes=("cat",)), "w")
    with pytest.raises(PipelineError, match=r"one class \('cat'\): a classifier needs at least two classes"):
        preprocess(archive, tmp_path / "processed", PreprocessParams(dataset="imagefolder", image_size=8))
    assert not (tmp_path / "processed").exists()


def test_a_class_emptied_by_skip_is_refused(tmp_path):
    members = folder_members(classes=("a", "b", "c"))
    members.update({"train/c/0.png": b"junk", "train/c/1.png": b""})
    archive = make_tar(tmp_path / "d.tar", members, "w")
    with pytest.raises(PipelineError, match=r"class\(es\) c have no training images left once the bad files are skipped"):
        read_archive(archive, image_size=8, bad_images="skip")


def test_class_names_are_printed_escaped():
    result = {"path": "x.png", "top": [{"class": "cat\nerror: fake", "prob": 0.75}, {"class": "dog\t", "prob": 0.25}]}
    assert format_text(result) == "x.png: cat\\nerror: fake (75.0%), dog\\t (25.0%)"


# --- 2. a folder source: links that leave it, special files ------------------------------------

def test_a_folder_source_refuses_links_out_and_special_files(tmp_path):
    src = tmp_path / "photos"
    for rel, data in folder_members().items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "train/a/passwd.png").symlink_to("/etc/passwd")
    (src / "train/a/zero.png").symlink_to("/dev/zero")
    os.mkfifo(src / "train/b/fifo.png")
    (src / "train/b/inside.png").symlink_to(src / "train/b/0.png")  # inside: packed as that file
    with pytest.raises(PipelineError) as e:
        fetch(str(src), tmp_path / "raw", md5="")
    assert str(e.value) == (
        f"download.url = {str(src)!r}: refusing to pack 3 entries that are not a file in the folder: "
        f"train/a/passwd.png: a link to /etc/passwd, outside {src}; train/a/zero.png: a link to /dev/zero, outside {src}; "
        "train/b/fifo.png: a FIFO (named pipe), not a file. Remove them, or copy the files they stand for into the folder")
    assert not (tmp_path / "raw").exists()
    for name in ("passwd.png", "zero.png"):
        (src / "train/a" / name).unlink()
    (src / "train/b/fifo.png").unlink()
    with tarfile.open(fetch(str(src), tmp_path / "raw", md5="")) as tar:
        assert tar.extractfile("train/b/inside.png").read() == (src / "train/b/0.png").read_bytes()


# --- 3. errors that name the right cause -------------------------------------------------------

@pytest.fixture(scope="module")
def export_files(tmp_path_factory) -> Path:
    """The export stage's three kinds of model file, of an untrained seed_cnn, and two fakes."""
    from imgclf.models.bundle import make_bundle
    from imgclf.models.registry import build

    d = tmp_path_factory.mktemp("export")
    args = {"num_classes": 2, "image_size": 16}
    model = build("seed_cnn", args, [0.5] * 3, [0.25] * 3).eval()
    save_state_bundle(make_bundle(model, arch="seed_cnn", arch_args=args, classes=["a", "b"], mean=[0.5] * 3,
                                  std=[0.25] * 3, image_size=16), d / "model_state.pt")
    save_whole_model(model, d / "model.pt")
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), d / "model.pt2")
    (d / "junk.pt2").write_text("hello\n")
    (d / "junk.pt").write_text("hello, not a model\n")
    cv2.imwrite(str(d / "x.png"), np.full((16, 16, 3), 90, np.uint8))
    return d


@pytest.mark.parametrize("name,message", [
    ("model.pt", "{d}/model.pt: a whole-model file (torch.save(model)): loading it runs code from the file. If you "
                 "trust it: --whole-model {d}/model.pt, with --model naming the state_dict file exported with it "
                 "(models/model_state.pt, for the class names)"),
    ("model.pt2", "{d}/model.pt2: a torch.export program (.pt2), for serving: load it with "
                  "torch.export.load(path).module(). imgclf-predict takes the state_dict file (models/model_state.pt) "
                  "or the ONNX file as --model"),
    ("junk.pt2", "{d}/junk.pt2: not a model file (neither a PyTorch file, which is a zip archive, nor ONNX)"),
    ("junk.pt", "{d}/junk.pt: not a model file (neither a PyTorch file, which is a zip archive, nor ONNX)"),
])
def test_predict_names_what_a_model_file_is(export_files, name, message, capsys):
    assert main(["--model", str(export_files / name), str(export_files / "x.png")]) == 2
    assert capsys.readouterr().err == f"error: {message.format(d=export_files)}\n"


def test_a_damaged_cache_split_is_one_line(tmp_path):
    from helpers import preprocessed_cache

    cache = preprocessed_cache(tmp_path, 20)
    whole = (cache / "train.pt").read_bytes()
    for damage in (b"", whole[: len(whole) // 2], bytes(len(whole))):
        (cache / "train.pt").write_bytes(damage)
        with pytest.raises(PipelineError) as e:
            load_cache(cache)
        assert str(e.value) == (
            f"{cache}/train.pt: damaged, does not load as a cache split (not a PyTorch file: no zip archive); rerun "
            "`dvc repro preprocess` (or `dvc checkout data/processed` to restore it from DVC's cache)")


def test_the_params_stage_checks_model_arch(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["arch"] = "resnet_fats"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/params.py")], cwd=tmp_path, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == (
        "error (params): model.arch = 'resnet_fats': unknown architecture; known: resnet_fast, seed_cnn, seed_cnn_bn, "
        "vgg16, whitened_net\n")


SLEEPING_STAGE = """import sys, time
from imgclf.core.stage import report_failures
report_failures("train", lambda: (print("started", flush=True), time.sleep(60)), resumes="rerun to resume")
"""


def test_sigterm_stops_a_stage_as_ctrl_c_does(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_STAGE], cwd=tmp_path, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err == "train: stopped by SIGTERM; rerun to resume\n"


# --- 5. one stage at a time per workspace ------------------------------------------------------

def test_a_second_stage_in_one_workspace_is_refused_and_params_changes_are_caught(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.01\n")
    first = subprocess.Popen([sys.executable, "-c", SLEEPING_STAGE], cwd=tmp_path, env=run_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "started\n"
        second = subprocess.run([sys.executable, "-c", SLEEPING_STAGE.replace('"train"', '"params"')], cwd=tmp_path,
                                env=run_env(), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr == (
            f"error (params): stage train (pid {first.pid}) is running in this workspace; two `dvc exp run` (or "
            "`dvc repro`) at once in one workspace overwrite each other's params.yaml and outputs. Wait for it, or "
            "queue it (`dvc exp run --queue ...`, then `dvc queue start`) or run it in a temporary copy of the "
            "workspace (`dvc exp run --temp ...`)\n")
    finally:
        first.kill()
        first.communicate()
    changing = SLEEPING_STAGE.replace("time.sleep(60)", "open('params.yaml', 'w').write('train:\\n  lr: 0.02\\n')")
    proc = subprocess.run([sys.executable, "-c", changing], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith(
        "error (train): params.yaml changed while stage train ran (another `dvc exp run` in this workspace?), so its "
        "outputs do not match the file and are not recorded"), proc.stderr
