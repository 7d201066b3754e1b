"""Offline, out of the box: the demo's sample (tools/make_sample.py) is what its PROVENANCE
says, and `make run` chooses the demo where the data's address does not answer
(tools/choose_run.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import socket
from pathlib import Path

import cv2
import numpy as np

from imgclf.data.imagefolder import read_archive
from imgclf.download.fetch import fetch

from helpers import CLASSES, ROOT, make_tar

SAMPLE_CLASSES = ["cat", "dog", "ship"]

TRAIN_PER_CLASS, TEST_PER_CLASS = 7, 4


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


def source_members() -> dict[str, bytes]:
    """A tiny image-folder archive's members: 3 classes, 7 train + 4 test images each, and files
    the preprocess stage ignores (hidden ones, a README outside the split folders)."""
    members, seed = {}, 0
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for cls in SAMPLE_CLASSES:
            for i in range(n):
                members[f"pics/{split}/{cls}/{cls}{i:02d}.png"] = png(seed)
                seed += 1
    members["pics/README.txt"] = b"not an image"
    members["pics/train/cat/.DS_Store"] = b"junk"
    return members


def tool(name: str):
    """A script of tools/ as a module: its main(argv) is what the command line runs."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Ran:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def make_sample(capsys, source: Path, out: Path, *args: str) -> Ran:
    try:
        tool("make_sample").main([str(source), str(out), *args])
        code = 0
    except SystemExit as e:
        code = e.code
    return Ran(code, capsys.readouterr().err)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_sample_is_stratified_deterministic_and_as_its_provenance_says(tmp_path, capsys):
    members = source_members()
    source = make_tar(tmp_path / "pics.tar.gz", members)
    out = tmp_path / "sample"
    proc = make_sample(capsys, source, out, "--train", "6", "--test", "3", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    files = tree(out)
    images = {k: v for k, v in files.items() if k not in ("PROVENANCE", "SHA256SUMS")}

    # Stratified: 2 train and 1 test image per class; each the source file's very bytes.
    for split, per_class in (("train", 2), ("test", 1)):
        for cls in SAMPLE_CLASSES:
            chosen = sorted(k for k in images if k.startswith(f"{split}/{cls}/"))
            assert len(chosen) == per_class, (split, cls, chosen)
            # the documented rule: the smallest sha256("<seed>:<path>") in each class
            pool = sorted(p.removeprefix("pics/") for p in members if p.startswith(f"pics/{split}/{cls}/")
                          and p.endswith(".png"))
            expected = sorted(sorted(pool, key=lambda p: hashlib.sha256(f"7:{p}".encode()).hexdigest())[:per_class])
            assert chosen == expected
    assert len(images) == 9 and all(images[k] == members[f"pics/{k}"] for k in images)

    # Deterministic: the same bytes again, and the same images from the archive's members in
    # another order; another seed chooses others.
    assert make_sample(capsys, source, out, "--train", "6", "--test", "3", "--seed", "7").returncode == 0
    assert tree(out) == files
    names = list(members)
    random.Random(0).shuffle(names)
    shuffled = make_tar(tmp_path / "shuffled.tar.gz", {k: members[k] for k in names})
    again = make_sample(capsys, shuffled, tmp_path / "again", "--train", "6", "--test", "3", "--seed", "7")
    assert again.returncode == 0
    assert {k: v for k, v in tree(tmp_path / "again").items() if k != "PROVENANCE"} == {
        k: v for k, v in files.items() if k != "PROVENANCE"}  # another archive, so another PROVENANCE
    assert make_sample(capsys, source, tmp_path / "other", "--train", "6", "--test", "3", "--seed", "8").returncode == 0
    assert set(tree(tmp_path / "other")) != set(files)

    # PROVENANCE: the source, its digests, the rule, the counts per class, the command.
    provenance = files["PROVENANCE"].decode()
    data = source.read_bytes()
    assert f"source: {source.name}\n" in provenance
    assert f"source sha256: {hashlib.sha256(data).hexdigest()}\n" in provenance
    assert f"source md5: {hashlib.md5(data).hexdigest()}\n" in provenance
    assert f"source size: {len(data)} bytes\n" in provenance
    assert 'sha256("7:<path>") is smallest' in provenance and "seed: 7\n" in provenance
    assert "images: 6 train + 3 test\n" in provenance
    for cls in SAMPLE_CLASSES:
        assert f"\n  {cls:<12}      2      1\n" in provenance
    assert f"command: python tools/make_sample.py {source.name} {out.name} --train 6 --test 3 --seed 7\n" in provenance
    # SHA256SUMS: each image once, as `sha256sum -c` reads it.
    assert files["SHA256SUMS"].decode() == "".join(f"{hashlib.sha256(images[k]).hexdigest()}  {k}\n" for k in sorted(images))

    # The pipeline reads the sample folder as an image folder with those counts.
    archive = fetch(str(out), tmp_path / "raw")
    ds = read_archive(archive, image_size=8)
    assert ds.classes == SAMPLE_CLASSES
    assert np.bincount(ds.train.labels.numpy()).tolist() == [2, 2, 2]
    assert np.bincount(ds.test.labels.numpy()).tolist() == [1, 1, 1]


def test_the_committed_sample_is_what_its_checksums_and_provenance_say():
    """data/sample/cifar10-sample, the embedded default: every file listed once with its
    sha256, nothing else, 200 train and 50 test images per class, at most 3 MB, drawn from the
    archive the datasets README names (tools/make_sample.py rebuilds it byte for byte)."""
    sample = ROOT / "data/sample/cifar10-sample"
    listed = {}
    for line in (sample / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        assert rel not in listed, rel
        listed[rel] = digest
    files = {p.relative_to(sample).as_posix() for p in sample.rglob("*") if p.is_file()}
    assert set(listed) == files - {"PROVENANCE", "SHA256SUMS"}
    assert {rel: hashlib.sha256((sample / rel).read_bytes()).hexdigest() for rel in listed} == listed
    per_split_class: dict[tuple[str, str], int] = {}
    for rel in listed:
        split, cls, _ = rel.split("/")
        per_split_class[split, cls] = per_split_class.get((split, cls), 0) + 1
    assert sorted({cls for _, cls in per_split_class}) == CLASSES
    assert set(per_split_class.values()) == {200, 50}
    assert all(n == (200 if split == "train" else 50) for (split, _), n in per_split_class.items())
    assert sum((sample / rel).stat().st_size for rel in files) <= 3_000_000
    provenance = (sample / "PROVENANCE").read_text()
    assert "source: cifar10-jpeg.tar.gz\nsource size: 19437144 bytes\n" in provenance
    assert "source md5: da369a48cbcb5cb959d673f67ad8c0ed\n" in provenance and "seed: 0\n" in provenance


def test_a_sample_it_cannot_stratify_is_refused_in_one_line(tmp_path, capsys):
    source = make_tar(tmp_path / "pics.tar.gz", source_members())
    uneven = make_sample(capsys, source, tmp_path / "s", "--train", "7")
    assert uneven.returncode == 1 and "Traceback" not in uneven.stderr
    assert "--train 7 is not a multiple of the 3 classes" in uneven.stderr
    too_many = make_sample(capsys, source, tmp_path / "s", "--train", "6", "--test", "15")
    assert too_many.returncode == 1 and "test/cat has 4 images; the sample needs 5 per class" in too_many.stderr
    assert not (tmp_path / "s").exists()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_run(capsys, *args: str) -> Ran:
    code = tool("choose_run").main(["--timeout", "2", *args])
    return Ran(code, capsys.readouterr().err)


def test_make_run_chooses_the_demo_where_the_data_does_not_answer(tmp_path, capsys, http_server):
    url = f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz"
    source = tmp_path / "cifar10-jpeg.tar.gz"
    source.write_bytes(b"an archive to make the sample from")
    offline = choose_run(capsys, "--url", url, "--sample", str(tmp_path / "none"), "--sample-source", str(source))
    assert offline.returncode == 3
    assert offline.stderr.startswith(f"make run: cannot reach {url} (")
    assert offline.stderr.strip().endswith("running the demo on the CIFAR-10 sample instead")
    assert len(offline.stderr.splitlines()) == 1

    # Neither the network nor the sample nor its source: one line says what to do.
    stuck = choose_run(capsys, "--url", url, "--sample", str(tmp_path / "none"),
                       "--sample-source", str(tmp_path / "none.tgz"))
    assert stuck.returncode == 4 and len(stuck.stderr.splitlines()) == 1
    assert "SAMPLE_SOURCE=" in stuck.stderr and "download.url=" in stuck.stderr

    # Where the address answers (a server on 127.0.0.1), the full pipeline runs; a 404 is no answer.
    online = choose_run(capsys, "--url", f"{http_server}/cifar-10-python.tar.gz", "--sample-source", str(source))
    assert online.returncode == 0 and online.stderr == ""
    missing = choose_run(capsys, "--url", f"{http_server}/nothing-here.tar.gz", "--sample-source", str(source))
    assert missing.returncode == 3 and "(HTTP 404 File not found)" in missing.stderr
