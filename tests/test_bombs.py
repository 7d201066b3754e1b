"""Memory bombs: small hostile inputs that would make preprocessing (or imgclf-predict) allocate
far more memory than the file holds. Each is refused by a real child process, which must exit
non-zero with one error message naming the cause, print no traceback, leave nothing at
data/processed, and peak at most MAX_GROWTH_KB above a baseline child running the same code
on a tiny valid input.

Each case is one child process, `python tests/peak_rss.py PEAK script args...`, which runs the
stage script (or imgclf-predict, or the decode call) as `python script` would and writes its
own peak RSS (VmHWM) as it exits; the children run a few at a time. The kernel's ru_maxrss
(os.wait4, RUSAGE_CHILDREN) would not do: at exec or fork it keeps the high-water mark of the
memory the process came from, so a child of this pytest process reports at least pytest's own
peak. A case may cap the child's data segment (RLIMIT_DATA), as a small machine would.

Every bomb is built here, byte by byte for the pickles.
"""

from __future__ import annotations

import io
import os
import pickle as P
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgclf.bench.cifar_writer import write_archive
from imgclf.core.errors import PipelineError
from imgclf.core.files import file_digest
from imgclf.data import safe_pickle
from imgclf.data.cifar import FOLDER
from imgclf.data.safe_pickle import UnsafePickleError, load_pickle

from helpers import CLASSES, ROOT, edit_params, make_split, make_tar, run_env

MAX_GROWTH_KB = 64 * 1024

# --- The bombs -------------------------------------------------------------------------------


def _str(b: bytes) -> bytes:
    return P.SHORT_BINSTRING + bytes([len(b)]) + b


def _int(n: int) -> bytes:
    return P.BININT + n.to_bytes(4, "little")


def _call(global_: bytes, *args: bytes) -> bytes:
    return P.GLOBAL + global_ + P.MARK + b"".join(args) + P.TUPLE + P.REDUCE


def _batch(*items: bytes) -> bytes:
    """A protocol-2 pickle of a dict: ``items`` are key and value opcodes, alternately."""
    return P.PROTO + b"\x02" + P.EMPTY_DICT + P.MARK + b"".join(items) + P.SETITEMS + P.STOP


N_BOMB = 150_000  # images the bomb claims: 460 MB of uint8, from a 79-byte pickle
PICKLES = {
    # numpy.ndarray(shape, 'B') allocates, uninitialised; the old reader took it as 150,000
    # images (and their labels) and cached them.
    "ndarray": _batch(
        _str(b"data"), _call(b"numpy\nndarray\n", _int(N_BOMB) + _int(3072) + P.TUPLE2, _str(b"B")),
        _str(b"labels"), _call(b"numpy\nndarray\n", _int(N_BOMB) + P.TUPLE1, _str(b"B")),
    ),
    # `}` then LONG_BINPUT 2**25: the C unpickler grows its memo array to 2**26 slots (512 MB).
    "memo": P.PROTO + b"\x02" + P.EMPTY_DICT + P.LONG_BINPUT + (2**25).to_bytes(4, "little") + P.STOP,
    # Object arrays, and a codec other than latin1, were callable from a batch.
    "dtype_object": _batch(_str(b"data"), _call(b"numpy\ndtype\n", _str(b"O"), P.NEWFALSE, P.NEWTRUE)),
    "codecs_zlib": _batch(
        _str(b"data"), _call(b"_codecs\nencode\n", P.SHORT_BINBYTES + b"\x05hello", _str(b"zlib"))
    ),
}


def png_bomb(width: int, height: int) -> bytes:
    """An all-black 8-bit RGB PNG, compressed row by row (never held whole)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def zip_of_zeros(path: Path, valid: dict[str, bytes], bombs: dict[str, int]) -> Path:
    """``valid`` members as given, then ``bombs``: name -> that many zero bytes, deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in valid.items():
            zf.writestr(name, data)
        block = bytes(1 << 20)
        for name, size in bombs.items():
            with zf.open(name, "w", force_zip64=True) as f:
                for start in range(0, size, len(block)):
                    f.write(block[: min(len(block), size - start)])
    return path


def tiny_png() -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".png", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()


def image_folder_members() -> dict[str, bytes]:
    return {f"{split}/{cls}/{i}.png": tiny_png() for split in ("train", "test") for cls in ("a", "b") for i in range(2)}


# --- Running a child and measuring it ----------------------------------------------------------


@dataclass
class Outcome:
    returncode: int
    output: str  # stdout + stderr
    peak_kb: int  # the child's peak RSS (VmHWM, KB)
    workdir: Path


PEAK_RSS = ROOT / "tests/peak_rss.py"
# The preprocess stage, as dvc runs it, in a folder holding params.yaml and data/raw/<archive>.
STAGE = str(ROOT / "stages/preprocess.py")
# What imgclf-predict does with each file it is given.
DECODE_FILE = """import sys
from imgclf.core.stage import report_failures
from imgclf.data.decode import load_image_file

report_failures("predict", lambda: load_image_file(sys.argv[1], 32))
"""


def _run_one(argv: list[str], d: Path) -> Outcome:
    """One child, ``python tests/peak_rss.py`` running ``argv`` in ``d``; its peak RSS."""
    peak = d / "peak_kb"
    proc = subprocess.run([sys.executable, str(PEAK_RSS), str(peak), *argv], cwd=d, env=run_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", timeout=300)
    return Outcome(proc.returncode, proc.stdout, int(peak.read_text()) if peak.exists() else -1, d)


def _run_all(runs: dict[str, tuple[list[str], Path]]) -> dict[str, Outcome]:
    """Every case in a child of its own, as many at a time as there are cores: each child
    imports what it needs (a few seconds for torch), and peaks are per process."""
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(_run_one, argv, d) for name, (argv, d) in runs.items()}
        return {name: f.result() for name, f in futures.items()}


def _model_bundle(path: Path) -> Path:
    """An untrained seed_cnn for two classes at 32 px, saved as the export stage saves it."""
    from imgclf.models.bundle import make_bundle
    from imgclf.models.registry import build

    from helpers import save_state_bundle

    args = {"num_classes": 2, "image_size": 32}
    model = build("seed_cnn", args, [0.5] * 3, [0.25] * 3)
    save_state_bundle(make_bundle(model, arch="seed_cnn", arch_args=args, classes=["a", "b"], mean=[0.5] * 3,
                                  std=[0.25] * 3, image_size=32), path)
    return path


def _stage_dir(root: Path, name: str, archive: Path, **preprocess) -> Path:
    d = root / name
    (d / "data/raw").mkdir(parents=True)
    shutil.copy(archive, d / "data/raw" / archive.name)
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    edit_params(d / "params.yaml", preprocess=preprocess)
    return d


def _cifar_with(tmp: Path, name: str, batch: bytes | None) -> Path:
    """A tiny official-format archive whose data_batch_1 is ``batch`` (None: left as written)."""
    good = tmp / "valid.tar.gz"
    if not good.exists():
        write_archive(good, make_split(20, 0), make_split(10, 1), CLASSES)
    if batch is None:
        return good
    with tarfile.open(good) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    members[f"{FOLDER}/data_batch_1"] = batch
    return make_tar(tmp / f"{name}.tar.gz", members)


# case -> (baseline case, what the user must see)
CASES = {
    "ndarray": ("cifar_baseline", ["data_batch_1", "refusing a call of numpy.ndarray"]),
    "memo": ("cifar_baseline", ["data_batch_1", "refusing memo index 33,554,432"]),
    "dtype_object": ("cifar_baseline", ["data_batch_1", "refusing numpy.dtype('O')"]),
    "codecs_zlib": ("cifar_baseline", ["data_batch_1", "refusing _codecs.encode(..., 'zlib')"]),
    "png_in_archive": ("folder_baseline", ["train/a/bomb.png", "8500 x 8500 pixels", "preprocess.max_megapixels"]),
    "zip_one_member": ("folder_baseline", ["train/a/zeros.png", "300.0 MB uncompressed", "preprocess.max_member_mb"]),
    "zip_many_members": ("folder_baseline", ["60 file(s) could not be decoded", "train/a/zeros_000.png"]),
    # Issue 22: empty members cost a whole image slot each (5,000 at 224 px: +750 MB).
    "empty_members": ("folder_baseline", ["5000 file(s) could not be decoded", "train/a/e0000.png: empty file"]),
    "member_count": ("folder_baseline", ["holds 3,008 members, over the limit of 1,000 (preprocess.max_members)"]),
    # 1,520 CIFAR-10 images at 1024 px need 4.8 GB: refused before the resize, on a 3 GB machine.
    "cifar_1024": ("cifar_baseline", ["preprocess.image_size = 1024: a cache of 1,520 images needs 4.8 GB",
                                      "ulimit -d (RLIMIT_DATA)"]),
    "png_predict": ("predict_baseline", ["bomb.png: 8500 x 8500 pixels (72.2 megapixels), over the limit of 50 megapixels"]),
    "hdr_backstop": ("predict_baseline", ["huge.hdr: more pixels than OpenCV's limit"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    tmp = tmp_path_factory.mktemp("bombs")
    runs: dict[str, tuple[list[str], Path]] = {}  # name -> (script and arguments, working folder)
    decode_file = tmp / "decode_file.py"
    decode_file.write_text(DECODE_FILE)

    # The CIFAR-10 reader: a tiny valid archive, and the same with data_batch_1 a bomb.
    runs["cifar_baseline"] = ([STAGE], _stage_dir(tmp, "cifar_baseline", _cifar_with(tmp, "valid", None)))
    for name, batch in PICKLES.items():
        runs[name] = ([STAGE], _stage_dir(tmp, name, _cifar_with(tmp, name, batch)))

    # The image-folder reader.
    folder = dict(image_folder_members())
    imagefolder = {"dataset": "imagefolder", "workers": 2}
    runs["folder_baseline"] = ([STAGE], _stage_dir(tmp, "folder_baseline", make_tar(tmp / "folder.tar", folder, "w"), **imagefolder))
    bomb_png = png_bomb(8500, 8500)  # 216.8 MB of pixels
    png_tar = make_tar(tmp / "png.tar", {**folder, "train/a/bomb.png": bomb_png}, "w")
    runs["png_in_archive"] = ([STAGE], _stage_dir(tmp, "png_in_archive", png_tar, **imagefolder))
    one = zip_of_zeros(tmp / "one.zip", folder, {"train/a/zeros.png": 300 * 10**6})
    runs["zip_one_member"] = ([STAGE], _stage_dir(tmp, "zip_one_member", one, **imagefolder))
    many = zip_of_zeros(tmp / "many.zip", folder, {f"train/a/zeros_{i:03d}.png": 4_800_000 for i in range(60)})
    runs["zip_many_members"] = ([STAGE], _stage_dir(tmp, "zip_many_members", many, **imagefolder))

    # Members that hold nothing: empty, or so many that their bookkeeping alone would add up.
    with tarfile.open(tmp / "empty.tar.gz", "w:gz") as tar:
        for name, data in folder.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(5000):
            tar.addfile(tarfile.TarInfo(f"train/a/e{i:04d}.png"))
    runs["empty_members"] = ([STAGE], _stage_dir(tmp, "empty_members", tmp / "empty.tar.gz", **imagefolder, image_size=224))
    count = zip_of_zeros(tmp / "count.zip", {**folder, **{f"train/a/e{i:04d}.png": b"" for i in range(3000)}}, {})
    runs["member_count"] = ([STAGE], _stage_dir(tmp, "member_count", count, **imagefolder, max_members=1000))
    small = tmp / "cifar1500.tar.gz"
    write_archive(small, make_split(1500, 0), make_split(20, 1), CLASSES)
    runs["cifar_1024"] = (["--limit-data", str(3 * 10**9), STAGE], _stage_dir(tmp, "cifar_1024", small, image_size=1024))

    # imgclf-predict on a valid image beside files it must refuse unread: 200 MB (sparse), a
    # link to /dev/zero (read whole, it never ends), a FIFO (opening it waits for a writer).
    predict_script = tmp / "predict.py"
    predict_script.write_text("import sys\nfrom imgclf.serve.predict import main\n\nsys.exit(main())\n")
    model = _model_bundle(tmp / "model_state.pt")
    for name, extra in (("cli_baseline", False), ("cli_bad_files", True)):
        d = tmp / name
        d.mkdir()
        (d / "good.png").write_bytes(tiny_png())
        argv = [str(predict_script), "--model", str(model), "good.png"]
        if extra:
            with open(d / "big.png", "wb") as f:
                f.truncate(200 * 10**6)
            (d / "zero.png").symlink_to("/dev/zero")
            os.mkfifo(d / "fifo.png")
            argv += ["big.png", "zero.png", "fifo.png"]
        runs[name] = (["--limit-data", str(3 * 10**9), *argv], d)

    # Decoding one file, as imgclf-predict does; a header only OpenCV reads meets its backstop.
    for name, file, data in (
        ("predict_baseline", "small.png", tiny_png()),
        ("png_predict", "bomb.png", bomb_png),
        ("hdr_backstop", "huge.hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 13400 +X 13400\n"),
    ):
        d = tmp / name
        d.mkdir()
        (d / file).write_bytes(data)
        runs[name] = ([str(decode_file), file], d)

    # What makes them bombs: kilobytes that expand to hundreds of megabytes.
    assert len(bomb_png) < 250_000 and one.stat().st_size < 300_000 and many.stat().st_size < 400_000
    return _run_all(runs)


def test_baselines_succeed(outcomes):
    for name in ("cifar_baseline", "folder_baseline", "predict_baseline", "cli_baseline"):
        o = outcomes[name]
        assert o.returncode == 0 and o.peak_kb > 0, f"{name}:\n{o.output}"
    assert (outcomes["cifar_baseline"].workdir / "data/processed/train.pt").exists()
    assert (outcomes["folder_baseline"].workdir / "data/processed/train.pt").exists()


@pytest.mark.parametrize("case", CASES)
def test_bomb_is_refused_with_bounded_memory(outcomes, case):
    baseline_name, needles = CASES[case]
    o, baseline = outcomes[case], outcomes[baseline_name]
    assert o.returncode == 1, o.output
    assert "Traceback" not in o.output
    errors = [line for line in o.output.splitlines() if line.startswith("error (")]
    assert len(errors) == 1, o.output  # one message (an image-folder one lists the files below it)
    for needle in needles:
        assert needle in o.output, f"{needle!r} not in:\n{o.output}"
    assert not (o.workdir / "data/processed").exists()
    assert o.peak_kb > 0, "the child did not report its peak RSS"
    growth = o.peak_kb - baseline.peak_kb
    print(f"{case}: peak RSS {o.peak_kb / 1024:.0f} MB, baseline {baseline.peak_kb / 1024:.0f} MB, growth {growth / 1024:+.0f} MB")
    assert growth <= MAX_GROWTH_KB, f"{case}: peak RSS {growth / 1024:.0f} MB above the baseline"


def test_predict_refuses_bad_files_unread_and_classifies_the_good_one(outcomes):
    # Issue 22: the link to /dev/zero ended in "cannot run the model: MemoryError", exit 2,
    # and good.png got no result; a 3 GB file was read whole.
    o, baseline = outcomes["cli_bad_files"], outcomes["cli_baseline"]
    assert baseline.returncode == 0 and o.returncode == 1, o.output
    lines = o.output.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith("good.png: ")] == ["big.png", "zero.png", "fifo.png"], o.output
    assert "big.png: error: 200.0 MB, over the limit of 64 MB (--max-mb); not read" in lines
    assert "zero.png: error: a character device, a link to /dev/zero, not a regular file; not read" in lines
    assert "fifo.png: error: a FIFO (named pipe), not a regular file; not read" in lines
    assert [line for line in lines if line.startswith("good.png: ")] == [
        line for line in baseline.output.splitlines() if line.startswith("good.png: ")] != []
    growth = o.peak_kb - baseline.peak_kb
    print(f"predict: peak RSS {o.peak_kb / 1024:.0f} MB, baseline {baseline.peak_kb / 1024:.0f} MB, growth {growth / 1024:+.0f} MB")
    assert growth <= MAX_GROWTH_KB


def test_ndarray_bomb_through_dvc_repro(project, tmp_path):
    # The reproduction: `dvc repro` exited 0 and cached 150,080 "images".
    bomb = _cifar_with(tmp_path, "bomb", PICKLES["ndarray"])
    project.set_params(download={"url": str(bomb), "md5": file_digest(bomb)})
    proc = project.dvc("repro", "preprocess", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "data_batch_1: refusing a call of numpy.ndarray" in text and "Traceback" not in text
    assert not (project.path / "data/processed").exists()


# --- The unpickler's guards, in process ----------------------------------------------------

def _array(shape_ops: bytes, dtype: bytes, data_ops: bytes, state: bytes = _str(b"|")) -> bytes:
    """NumPy's own reduction: _reconstruct(ndarray, (0,), 'b'), then BUILD with its state."""
    dtype_ops = _call(b"numpy\ndtype\n", _str(dtype), P.NEWFALSE, P.NEWTRUE) + P.MARK + P.BININT1 + b"\x03" + state + P.NONE * 3 + _int(2**32 - 1) * 2 + P.BININT1 + b"\0" + P.TUPLE + P.BUILD
    return (
        _call(b"numpy.core.multiarray\n_reconstruct\n", P.GLOBAL + b"numpy\nndarray\n", P.BININT1 + b"\0" + P.TUPLE1, _str(b"b"))
        + P.MARK + P.BININT1 + b"\x01" + shape_ops + dtype_ops + P.NEWFALSE + data_ops + P.TUPLE + P.BUILD
    )


REFUSED = {
    # A shape of 460 MB over 3 bytes of data: refused before NumPy allocates.
    "shape beyond its bytes": (
        _batch(_str(b"data"), _array(_int(N_BOMB) + _int(3072) + P.TUPLE2, b"u1", _str(b"xyz"))),
        "refusing an array of shape (150000, 3072) and 460,800,000 bytes whose data holds 3",
    ),
    "_reconstruct of a shape": (
        _batch(_str(b"data"), _call(b"numpy.core.multiarray\n_reconstruct\n", P.GLOBAL + b"numpy\nndarray\n", _int(N_BOMB) + _int(3072) + P.TUPLE2, _str(b"B"))),
        "refusing _reconstruct(numpy.ndarray, (150000, 3072), 'B')",
    ),
    "float dtype": (_batch(_str(b"d"), _call(b"numpy\ndtype\n", _str(b"f8"), P.NEWFALSE, P.NEWTRUE)), "refusing numpy.dtype('f8')"),
    "strange byte order": (
        _batch(_str(b"data"), _array(_int(1) + P.TUPLE1, b"u1", _str(b"x"), state=_str(b"?"))), "refusing byte order '?'"
    ),
    "state of a global": (
        _batch(_str(b"d"), P.GLOBAL + b"numpy\ndtype\n" + P.EMPTY_DICT + P.BUILD), "refusing setting the state of numpy.dtype"
    ),
    # One 100,000-character string encoded 100 times through the memo: 10 MB from 100 kB.
    "encode through the memo": (
        P.PROTO + b"\x02" + P.BINUNICODE + (100_000).to_bytes(4, "little") + b"a" * 100_000 + P.BINPUT + b"\0" + P.POP
        + P.MARK + (_call(b"_codecs\nencode\n", P.BINGET + b"\0", _str(b"latin1")) + P.POP) * 100 + P.POP_MARK
        + P.EMPTY_DICT + P.STOP,
        "refusing encode data larger than the file itself",
    ),
    "sets": (P.PROTO + b"\x04" + P.EMPTY_SET + P.STOP, "refusing the pickle opcode EMPTY_SET"),
    "instantiation": (P.PROTO + b"\x02" + P.GLOBAL + b"numpy\nndarray\n" + P.EMPTY_TUPLE + P.NEWOBJ + P.STOP, "refusing the pickle opcode NEWOBJ"),
    # DUP: one byte for one more reference on the stack.
    "opcode count": (P.PROTO + b"\x02" + P.EMPTY_LIST + P.DUP * 20_000 + P.STOP, "refusing a pickle of more than 10,078 opcodes in 20,004 bytes"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unpickler_refuses(case):
    data, message = REFUSED[case]
    with pytest.raises(UnsafePickleError) as e:
        load_pickle(data, source="data_batch_1")
    assert str(e.value).startswith("data_batch_1: ") and message in str(e.value)


def test_unpickler_bounds_the_memo_count(monkeypatch):
    monkeypatch.setattr(safe_pickle, "MAX_MEMO", 10)
    puts = b"".join(P.BINPUT + bytes([i]) for i in range(11))
    with pytest.raises(UnsafePickleError, match="refusing more than 10 memo entries"):
        load_pickle(P.PROTO + b"\x02" + P.EMPTY_DICT + puts + P.STOP, source="b")
    assert load_pickle(P.PROTO + b"\x02" + P.EMPTY_DICT + puts[:-2] + P.STOP, source="b") == {}


def test_a_length_beyond_the_data_is_never_allocated():
    # The C unpickler allocates a BINBYTES8's declared length before reading it (here 1 TB).
    data = P.PROTO + b"\x04" + P.BINBYTES8 + (2**40).to_bytes(8, "little") + b"abc" + P.STOP
    with pytest.raises(PipelineError, match="not a readable CIFAR-10 pickle.*1099511627776 bytes"):
        load_pickle(data, source="b")


@pytest.mark.parametrize("protocol", [2, 4])
def test_python3_pickles_of_arrays_still_load(protocol):
    import numpy as np

    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    labels = np.array([3, 1], dtype=">i4")  # big-endian
    fortran = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    batch = load_pickle(P.dumps({"data": images, "labels": labels, "f": fortran}, protocol=protocol), source="b")
    assert (batch["data"] == images).all() and batch["labels"].tolist() == [3, 1]
    assert (batch["f"] == fortran).all()
