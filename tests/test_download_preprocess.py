"""The download and preprocess stages, through the real `dvc repro`, on tiny official-format data."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import socket
import tarfile

import pytest
import torch

from imgclf.bench.cifar_writer import write_archive
from imgclf.core.errors import PipelineError
from imgclf.core.files import file_digest
from imgclf.core.params import PreprocessParams
from imgclf.data.cifar import FOLDER, read_archive
from imgclf.data.preprocess import preprocess
from imgclf.data.safe_pickle import UnsafePickleError, load_pickle

from helpers import CLASSES, make_split, make_tar


def test_repro_downloads_verifies_and_caches(project, cifar_archive):
    proc = project.dvc("repro", "preprocess")
    assert project.ran_stages(proc) == ["download", "preprocess"]
    raw = list((project.path / "data/raw").iterdir())
    assert [p.name for p in raw] == ["cifar-10-python.tar.gz"]
    assert file_digest(raw[0]) == file_digest(cifar_archive)

    processed = project.path / "data/processed"
    meta = json.loads((processed / "meta.json").read_text())
    assert meta["classes"] == CLASSES
    assert (meta["num_train"], meta["num_test"], meta["image_size"]) == (200, 50, 32)
    train = torch.load(processed / "train.pt", weights_only=True)
    expected = read_archive(cifar_archive)
    assert torch.equal(train["images"], expected.train.images)
    assert torch.equal(train["labels"], expected.train.labels)
    # Normalisation statistics are those of the train split on the [0, 1] scale.
    x = expected.train.images.double() / 255
    assert meta["mean"] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert meta["std"] == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)
    # The sample grid for TensorBoard.
    assert any((project.path / "logs/preprocess").glob("events.out.tfevents.*"))


def test_rerun_rules(project):
    project.dvc("repro", "preprocess")
    assert project.ran_stages(project.dvc("repro", "preprocess")) == []

    project.set_params(preprocess={"image_size": 16})
    assert project.ran_stages(project.dvc("repro", "preprocess")) == ["preprocess"]
    meta = json.loads((project.path / "data/processed/meta.json").read_text())
    assert meta["image_size"] == 16
    images = torch.load(project.path / "data/processed/test.pt", weights_only=True)["images"]
    assert images.shape == (50, 3, 16, 16) and images.dtype == torch.uint8

    # A new download.url (the same archive through file://) reruns both stages.
    url = project.params()["download"]["url"]
    local = project.path.parent / "mirror.tar.gz"
    local.write_bytes((project.path / "data/raw/cifar-10-python.tar.gz").read_bytes())
    project.set_params(download={"url": local.as_uri()})
    assert project.ran_stages(project.dvc("repro", "preprocess")) == ["download", "preprocess"]
    assert url != project.params()["download"]["url"]


def test_plain_local_path_source(project, cifar_archive):
    project.set_params(download={"url": str(cifar_archive)})
    assert project.ran_stages(project.dvc("repro", "preprocess")) == ["download", "preprocess"]
    assert (project.path / "data/processed/train.pt").exists()


def _assert_failed(proc, *needles):
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for needle in needles:
        assert needle in text, f"{needle!r} not in output:\n{text}"
    assert "Traceback" not in text


def test_checksum_mismatch_leaves_nothing(project):
    project.set_params(download={"md5": "0" * 32})
    proc = project.dvc("repro", "download", check=False)
    _assert_failed(proc, "checksum mismatch", "expected md5 " + "0" * 32, "got ")
    assert not (project.path / "data/raw").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed as soon as we leave: nothing listens there


def test_unreachable_url_fails_fast_with_hint(project):
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    project.set_params(download={"url": url, "timeout": 5})
    proc = project.dvc("repro", "download", check=False)
    _assert_failed(proc, f"cannot reach {url}", "download.url", "local")
    assert not (project.path / "data/raw").exists()


def test_truncated_archive_fails_cleanly(project, cifar_archive, tmp_path):
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(cifar_archive.read_bytes()[: cifar_archive.stat().st_size // 2])
    project.set_params(download={"url": str(truncated), "md5": file_digest(truncated)})
    proc = project.dvc("repro", "preprocess", check=False)
    _assert_failed(proc, "truncated or corrupt archive")
    assert not (project.path / "data/processed").exists()


def test_archive_cut_at_a_member_boundary_is_refused(cifar_archive, tmp_path):
    # Every batch is there; only readme.html and the tar's end-of-archive blocks are missing.
    # tarfile alone reads that as a complete, shorter archive, and so did the old reader.
    data = gzip.decompress(cifar_archive.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert members[-1].name == f"{FOLDER}/readme.html"
    cut = tmp_path / "cifar-10-python.tar.gz"
    cut.write_bytes(gzip.compress(data[: members[-1].offset]))
    with tarfile.open(cut) as tar:
        assert [m.name for m in tar] == [m.name for m in members[:-1]]
    with pytest.raises(PipelineError, match="truncated or corrupt archive") as e:
        preprocess(cut, tmp_path / "processed", PreprocessParams(dataset="cifar10"))
    assert str(cut) in str(e.value)
    assert not (tmp_path / "processed").exists()


def test_bad_gzip_crc_is_refused(cifar_archive, tmp_path):
    data = bytearray(cifar_archive.read_bytes())
    data[-8] ^= 0xFF  # the CRC in the gzip trailer: every member still reads fine
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="truncated or corrupt archive"):
        read_archive(bad)


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", f"{FOLDER}/../../evil"])
def test_member_escaping_the_archive_is_refused(cifar_archive, tmp_path, name):
    with tarfile.open(cifar_archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    members[name] = b"evil"  # last, after every batch: refused even though nothing is missing
    evil = make_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(PipelineError, match="refusing archive member") as e:
        read_archive(evil)
    assert repr(name) in str(e.value)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_forbidden_pickle_global_is_refused(project, tmp_path):
    archive = tmp_path / "evil.tar.gz"
    write_archive(archive, make_split(20, 0), make_split(10, 1), CLASSES)
    # Replace one batch with a pickle that would run a shell command when loaded.
    members = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    members[f"{FOLDER}/data_batch_3"] = pickle.dumps({"data": _Evil()}, protocol=2)
    evil = make_tar(tmp_path / "evil2.tar.gz", members)
    project.set_params(download={"url": str(evil), "md5": file_digest(evil)})
    proc = project.dvc("repro", "preprocess", check=False)
    _assert_failed(proc, "data_batch_3", "refusing to load global", "system")
    assert not (project.path / "pwned").exists()
    assert not (project.path / "data/processed").exists()


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_both_key_spellings_load(cifar_archive, encoding):
    with tarfile.open(cifar_archive) as tar:
        raw = tar.extractfile(f"{FOLDER}/test_batch").read()
    # What plain pickle gives for each encoding: the two spellings of the keys.
    keys = set(pickle.loads(raw, encoding=encoding))
    assert keys == ({b"data", b"labels", b"batch_label", b"filenames"} if encoding == "bytes" else {"data", "labels", "batch_label", "filenames"})
    batch = load_pickle(raw, source="test_batch", encoding=encoding)
    assert batch["data"].shape == (50, 3072) and len(batch["labels"]) == 50


def test_unpickler_refuses_globals_without_running_them(tmp_path):
    with pytest.raises(UnsafePickleError, match=r"__builtin__\.eval"):
        load_pickle(pickle.dumps({"x": eval}, protocol=2), source="batch")


def test_invalid_params_stop_before_any_data(project):
    project.set_params(preprocess={"image_size": "big", "sample_imgs": 3})
    proc = project.dvc("repro", "download", check=False)
    _assert_failed(proc, "preprocess.image_size = 'big'", "unknown key 'preprocess.sample_imgs'")
    assert not (project.path / "data/raw").exists()


def test_cifar_cache_and_predict_resize_alike(cifar_archive, tmp_path):
    # One resize for every path: a CIFAR-10 batch cached at 64 px and the same image given to
    # imgclf-predict (decoded from a PNG) must hold identical pixels. (The cache used to be
    # resized by torchvision, predict by OpenCV: 30% of the pixels differed.)
    import cv2

    from imgclf.data.decode import load_image_file

    preprocess(cifar_archive, tmp_path / "processed", PreprocessParams(dataset="cifar10", image_size=64))
    cached = torch.load(tmp_path / "processed/test.pt", weights_only=True)["images"]
    raw = read_archive(cifar_archive).test.images
    assert cached.shape == (50, 3, 64, 64)
    for i in (0, 7, 49):
        png = tmp_path / f"{i}.png"
        cv2.imwrite(str(png), cv2.cvtColor(raw[i].permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR))
        predicted = torch.from_numpy(load_image_file(png, 64)).permute(2, 0, 1)
        assert torch.equal(predicted, cached[i]), f"image {i}: {(predicted != cached[i]).float().mean():.0%} of pixels differ"
