"""The image-folder reader: archive formats, layouts, pixel modes, bad files and hostile archives.

Every archive is built here from tiny images encoded with OpenCV (PIL for palette PNGs).
"""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.core.errors import PipelineError
from imgclf.data import decode, decoder
from imgclf.data.archive import Limits
from imgclf.data.decode import ImageFileError, decode_image, load_image_file
from imgclf.data.headers import image_dimensions
from imgclf.data.imagefolder import read_archive

from helpers import make_tar

SIZE = 8
RED_BGR = (0, 0, 255)  # OpenCV writes BGR; these are red images


def solid(color_bgr, size=SIZE, dtype=np.uint8, channels=3) -> np.ndarray:
    img = np.zeros((size, size, channels), dtype)
    img[...] = color_bgr
    return img


def encode(ext: str, img: np.ndarray, params: tuple = ()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def png(color_bgr, size=SIZE) -> bytes:
    return encode(".png", solid(color_bgr, size))


def palette_png(rgb, size=SIZE) -> bytes:
    img = Image.new("P", (size, size), 1)
    img.putpalette([0, 0, 0, *rgb] + [0] * (256 - 2) * 3)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# Three classes, each a solid colour (BGR), listed out of order to check the sorting.
COLOURS = {"zebra": (255, 0, 0), "ant": (0, 255, 0), "moth": (0, 0, 255)}


def dataset_members(prefix: str = "", test: str = "test", per_class: int = 2) -> dict[str, bytes]:
    members = {}
    for split, n in (("train", per_class), (test, 1)):
        for cls, colour in COLOURS.items():
            for i in range(n):
                members[f"{prefix}{split}/{cls}/{i:03d}.png"] = png(colour)
    return members


def check_solid_classes(d, n_train=6, n_test=3) -> None:
    assert d.classes == ["ant", "moth", "zebra"]
    assert d.train.images.shape == (n_train, 3, SIZE, SIZE)
    assert d.test.images.shape == (n_test, 3, SIZE, SIZE)
    for split in (d.train, d.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.labels.tolist() == sorted(split.labels.tolist())  # ImageFolder order: by class
        for img, label in zip(split.images, split.labels):
            b, g, r = COLOURS[d.classes[label]]
            assert img[:, 0, 0].tolist() == [r, g, b]  # stored as RGB


# --- Layouts and archive formats -------------------------------------------------------


def test_tar_gz_under_one_top_folder(tmp_path):
    archive = make_tar(tmp_path / "images.tar.gz", dataset_members("my-data/"))
    check_solid_classes(read_archive(archive, image_size=SIZE, bad_images="fail", workers=2))


def test_zip_with_val_split_and_misleading_name(tmp_path):
    # The format comes from the content: the download stage may name the file anything.
    archive = make_zip(tmp_path / "dataset.tar.gz", dataset_members(test="val"))
    check_solid_classes(read_archive(archive, image_size=SIZE, bad_images="fail", workers=1))


def test_plain_tar_and_uppercase_split_folders(tmp_path):
    members = {k.replace("train/", "Train/").replace("test/", "TEST/"): v for k, v in dataset_members().items()}
    archive = make_tar(tmp_path / "d.bin", members, mode="w")
    check_solid_classes(read_archive(archive, image_size=SIZE, bad_images="fail", workers=0))


def test_result_does_not_depend_on_member_order_or_chunking(tmp_path, monkeypatch):
    members = dataset_members(per_class=5)
    a = make_tar(tmp_path / "a.tar", members, mode="w")
    b = make_tar(tmp_path / "b.tar", dict(reversed(list(members.items()))), mode="w")
    ref = read_archive(a, image_size=SIZE, workers=1)
    monkeypatch.setattr(decoder, "CHUNK", 2)  # many chunks, several in flight
    other = read_archive(b, image_size=SIZE, workers=3)
    monkeypatch.setattr(decoder, "CHUNK", 256)
    monkeypatch.setattr(decoder, "IN_FLIGHT_BYTES", 600)  # chunks of ~100 bytes, ended by size
    by_bytes = read_archive(b, image_size=SIZE, workers=3)
    for d in (other, by_bytes):
        assert ref.classes == d.classes
        for x, y in ((ref.train, d.train), (ref.test, d.test)):
            assert (x.images == y.images).all() and (x.labels == y.labels).all()


def test_ignores_hidden_and_stray_files(tmp_path):
    members = dataset_members("top/")
    members.update({
        "top/.DS_Store": b"\0junk",
        "top/train/ant/.DS_Store": b"\0junk",
        "top/train/ant/._000.png": b"AppleDouble",
        "__MACOSX/top/train/ant/._000.png": b"AppleDouble",
        "top/README.txt": b"not an image, outside the splits",
        "top/train/notes.txt": b"directly in the split folder: no class",
        "top/labels/ant.txt": b"outside train/test/val",
    })
    check_solid_classes(read_archive(make_zip(tmp_path / "d.zip", members), image_size=SIZE))


def test_last_member_of_a_name_wins(tmp_path):
    # A tar may repeat a name; extracting it would leave the last copy, so that one counts.
    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in [*dataset_members().items(), ("train/ant/000.png", png(COLOURS["moth"]))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    d = read_archive(archive, image_size=SIZE)
    assert len(d.train) == 6
    ant = d.train.images[d.train.labels == d.classes.index("ant")]
    assert ant[0, :, 0, 0].tolist() == [255, 0, 0]  # moth's red, the later copy
    assert ant[1, :, 0, 0].tolist() == [0, 255, 0]


def test_symlink_inside_the_archive_is_followed(tmp_path):
    links = {"train/ant/link.png": (tarfile.SYMTYPE, "../zebra/000.png"), "train/ant/hard.png": (tarfile.LNKTYPE, "train/moth/000.png")}
    d = read_archive(make_tar(tmp_path / "d.tgz", dataset_members(), links=links), image_size=SIZE)
    ant = d.train.images[d.train.labels == d.classes.index("ant")]
    assert len(ant) == 4
    colours = sorted(tuple(img[:, 0, 0].tolist()) for img in ant)
    assert colours == [(0, 0, 255), (0, 255, 0), (0, 255, 0), (255, 0, 0)]


# --- Pixel modes -------------------------------------------------------------------------

# name -> (encoded bytes, expected RGB of every pixel)
MODES = {
    "rgb.png": (png(RED_BGR), (255, 0, 0)),  # BGR -> RGB: pure red comes out with R=255
    "gray.png": (encode(".png", np.full((SIZE, SIZE), 77, np.uint8)), (77, 77, 77)),
    # Alpha is dropped, keeping the stored colour even where fully transparent.
    "rgba.png": (encode(".png", solid((10, 20, 30, 0), channels=4)), (30, 20, 10)),
    "palette.png": (palette_png((12, 200, 34)), (12, 200, 34)),
    # 16 bit: round(v / 257), so 65535 -> 255 and 32896 -> 128 exactly, never clipped.
    "rgb16.png": (encode(".png", solid((0, 32896, 65535), dtype=np.uint16)), (255, 128, 0)),
    "gray16.png": (encode(".png", np.full((SIZE, SIZE), 65535, np.uint16)), (255, 255, 255)),
    "rgba16.png": (encode(".png", solid((257, 514, 1028, 7), dtype=np.uint16, channels=4)), (4, 2, 1)),
    "rgb.bmp": (encode(".bmp", solid(RED_BGR)), (255, 0, 0)),
    "gray.bmp": (encode(".bmp", np.full((SIZE, SIZE), 9, np.uint8)), (9, 9, 9)),
    "rgb.webp": (encode(".webp", solid((1, 2, 3)), (cv2.IMWRITE_WEBP_QUALITY, 101)), (3, 2, 1)),  # lossless
    "rgba.webp": (encode(".webp", solid((1, 2, 3, 128), channels=4), (cv2.IMWRITE_WEBP_QUALITY, 101)), (3, 2, 1)),
    "rgb16.tif": (encode(".tiff", solid((0, 0, 65535), dtype=np.uint16)), (255, 0, 0)),
    # Float: 0..1 scaled to 0..255 and rounded; outside that range clipped.
    "float.tif": (encode(".tiff", solid((-0.5, 0.5, 1.5), dtype=np.float32)), (255, 128, 0)),
}
LOSSY = {
    "red.jpg": (encode(".jpg", solid(RED_BGR), (cv2.IMWRITE_JPEG_QUALITY, 100)), (255, 0, 0)),
    "gray.jpg": (encode(".jpg", np.full((SIZE, SIZE), 100, np.uint8)), (100, 100, 100)),
}
# The flags used, and IMREAD_UNCHANGED to exercise the alpha and 1-channel conversions too.
FLAGS = {"default": decode.DECODE_FLAGS, "unchanged": cv2.IMREAD_UNCHANGED}


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("name", [*MODES, *LOSSY])
def test_every_mode_becomes_rgb_uint8(name, flags):
    data, expected = {**MODES, **LOSSY}[name]
    img, reason = decode._decode(data, SIZE, flags)
    assert reason == ""
    img = decode._to_rgb(img)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    tolerance = 3 if name in LOSSY else 0
    assert np.abs(img.astype(int) - expected).max() <= tolerance, img[0, 0]


def test_all_modes_through_an_archive(tmp_path):
    members = {f"train/{name.replace('.', '_')}/x.{name.split('.')[1]}": data for name, (data, _) in {**MODES, **LOSSY}.items()}
    members["test/rgb_png/y.png"] = MODES["rgb.png"][0]
    d = read_archive(make_tar(tmp_path / "modes.tar.gz", members), image_size=SIZE, workers=2)
    for img, label in zip(d.train.images, d.train.labels):
        name = d.classes[label].replace("_", ".")
        expected = {**MODES, **LOSSY}[name][1]
        tolerance = 3 if name in LOSSY else 0
        assert np.abs(img.numpy().astype(int) - np.array(expected)[:, None, None]).max() <= tolerance, name


def test_decode_image_is_the_training_decoder(tmp_path):
    data = encode(".png", np.random.default_rng(0).integers(0, 256, (20, 13, 3), dtype=np.uint8))
    d = read_archive(make_tar(tmp_path / "d.tar", {"train/a/x.png": data, "test/a/x.png": data}, "w"), image_size=SIZE)
    (tmp_path / "x.png").write_bytes(data)
    assert (d.train.images[0].permute(1, 2, 0).numpy() == decode_image(data, SIZE, "x.png")).all()
    assert (load_image_file(tmp_path / "x.png", SIZE) == decode_image(data, SIZE, "x.png")).all()


def test_resize_shrinks_with_area_and_enlarges_linearly():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)  # non-square: squashed to SIZE x SIZE
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    for img, interpolation in ((big, cv2.INTER_AREA), (small, cv2.INTER_LINEAR)):
        expected = cv2.cvtColor(cv2.resize(img, (SIZE, SIZE), interpolation=interpolation), cv2.COLOR_BGR2RGB)
        assert (decode_image(encode(".png", img), SIZE) == expected).all()


def test_16bit_is_scaled_with_rounding_not_clipped():
    values = [0, 128, 129, 257, 32896, 65278, 65407, 65535]  # -> 0, 0, 1, 1, 128, 254, 255, 255
    ramp = np.resize(np.array(values + list(np.linspace(0, 65535, SIZE * SIZE - len(values))), np.uint16), (SIZE, SIZE))
    got = decode_image(encode(".png", ramp), SIZE)[:, :, 0]
    assert got.flat[: len(values)].tolist() == [0, 0, 1, 1, 128, 254, 255, 255]
    assert (got == np.round(ramp / 257)).all()  # v / 257 is never exactly x.5: no ties


def test_exif_orientation_is_applied():
    img = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    img[:, :SIZE] = RED_BGR  # left half red, right half blue
    img[:, SIZE:] = (255, 0, 0)
    pil = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif, quality=100)
    out = decode_image(buf.getvalue(), 2 * SIZE).astype(int)
    assert out[0, :, 0].min() > 200 and out[0, :, 2].max() < 60  # top row red (was left)
    assert out[-1, :, 2].min() > 200 and out[-1, :, 0].max() < 60  # bottom row blue


@pytest.mark.parametrize("data", [b"", b"hello, not an image", png(RED_BGR)[:40], b"\xff\xd8\xff" + b"\0" * 50])
def test_undecodable_bytes_give_none_never_raise(data):
    assert decode_image(data, SIZE, "x") is None


def test_load_image_file_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for path, reason in ((tmp_path / "missing.png", "no such file"), (tmp_path / "notes.txt", "not an image"), (tmp_path, "folder")):
        with pytest.raises(ImageFileError, match=reason) as e:
            load_image_file(path, SIZE)
        assert str(path) in str(e.value) and isinstance(e.value, PipelineError)


# --- Bad images --------------------------------------------------------------------------


def with_bad_files(tmp_path) -> Path:
    members = dataset_members("d/")
    members["d/train/ant/broken.jpg"] = encode(".jpg", solid(RED_BGR))[:30]  # truncated JPEG
    members["d/test/moth/notes.txt"] = b"not an image"
    members["d/train/moth/empty.png"] = b""
    return make_tar(tmp_path / "bad.tar.gz", members)


def test_bad_images_fail_names_every_file_and_the_param(tmp_path):
    with pytest.raises(PipelineError) as e:
        read_archive(with_bad_files(tmp_path), image_size=SIZE, bad_images="fail")
    msg = str(e.value)
    for name in ("d/train/ant/broken.jpg", "d/test/moth/notes.txt", "d/train/moth/empty.png", "preprocess.bad_images=skip"):
        assert name in msg
    assert "3 file(s)" in msg


def test_bad_images_skip_leaves_them_out_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="imgclf.data.imagefolder"):
        d = read_archive(with_bad_files(tmp_path), image_size=SIZE, bad_images="skip")
    check_solid_classes(d)
    assert "skipped 3 file(s)" in caplog.text and "d/train/ant/broken.jpg" in caplog.text


# --- Layout errors -----------------------------------------------------------------------


def test_missing_test_split(tmp_path):
    members = {k: v for k, v in dataset_members().items() if k.startswith("train/")}
    with pytest.raises(PipelineError, match=r"no images in a test/ \(or val/\) folder"):
        read_archive(make_zip(tmp_path / "d.zip", members), image_size=SIZE)


def test_not_an_image_folder(tmp_path):
    with pytest.raises(PipelineError, match="no images in a train/ folder.*2 file"):
        read_archive(make_zip(tmp_path / "d.zip", {"a.png": png(RED_BGR), "b/c.png": png(RED_BGR)}), image_size=SIZE)


def test_test_class_missing_from_train(tmp_path):
    members = dataset_members()
    members["test/wasp/000.png"] = png(RED_BGR)
    with pytest.raises(PipelineError, match="wasp"):
        read_archive(make_zip(tmp_path / "d.zip", members), image_size=SIZE)


def test_two_top_level_folders(tmp_path):
    members = {**dataset_members("a/"), **dataset_members("b/")}
    with pytest.raises(PipelineError, match="several top-level folders"):
        read_archive(make_zip(tmp_path / "d.zip", members), image_size=SIZE)


def test_split_left_empty_after_skipping(tmp_path):
    members = {**{k: v for k, v in dataset_members().items() if k.startswith("train/")}, "test/ant/x.png": b"junk"}
    with pytest.raises(PipelineError, match="no decodable images left in test/"):
        read_archive(make_zip(tmp_path / "d.zip", members), image_size=SIZE, bad_images="skip")


# --- Broken and hostile archives ----------------------------------------------------------


def test_truncated_tar_gz(tmp_path):
    good = make_tar(tmp_path / "good.tar.gz", dataset_members())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PipelineError, match="truncated or corrupt archive") as e:
        read_archive(cut, image_size=SIZE)
    assert str(cut) in str(e.value)


def test_tar_cut_at_a_member_boundary(tmp_path):
    # tarfile alone reads this as a complete, shorter archive.
    good = make_tar(tmp_path / "good.tar", dataset_members(), mode="w")
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: members[-1].offset])
    with pytest.raises(PipelineError, match="truncated or corrupt archive"):
        read_archive(cut, image_size=SIZE)
    mid = tmp_path / "mid.tar"  # cut inside the last member's data
    mid.write_bytes(good.read_bytes()[: members[-1].offset_data + 10])
    with pytest.raises(PipelineError, match=f"truncated or corrupt archive.*{members[-1].name}"):
        read_archive(mid, image_size=SIZE)
    regz = tmp_path / "cut.tar.gz"
    regz.write_bytes(gzip.compress(cut.read_bytes()))
    with pytest.raises(PipelineError, match="truncated or corrupt archive"):
        read_archive(regz, image_size=SIZE)


def test_gzip_crc_is_checked(tmp_path):
    data = bytearray(make_tar(tmp_path / "good.tar.gz", dataset_members()).read_bytes())
    data[-8] ^= 0xFF  # the CRC in the gzip trailer
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="truncated or corrupt archive"):
        read_archive(bad, image_size=SIZE)


def test_truncated_zip(tmp_path):
    good = make_zip(tmp_path / "good.zip", dataset_members())
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(PipelineError, match="truncated or corrupt archive"):
        read_archive(cut, image_size=SIZE)


def test_not_an_archive(tmp_path):
    path = tmp_path / "photos.tar.gz"
    path.write_bytes(b"<html>404 not found</html>" * 40)
    with pytest.raises(PipelineError, match="not a tar, tar.gz or zip archive"):
        read_archive(path, image_size=SIZE)
    with pytest.raises(PipelineError, match="cannot open"):
        read_archive(tmp_path / "missing.tar", image_size=SIZE)


HOSTILE = {
    "parent": ({"../evil.png": png(RED_BGR)}, {}, "../evil.png"),
    "parent-inside": ({"train/ant/../../../evil.png": png(RED_BGR)}, {}, "train/ant/../../../evil.png"),
    "absolute": ({"/tmp/evil.png": png(RED_BGR)}, {}, "/tmp/evil.png"),
    "windows": ({"..\\evil.png": png(RED_BGR)}, {}, "..\\\\evil.png"),
    "symlink-out": ({}, {"train/ant/evil.png": (tarfile.SYMTYPE, "../../../etc/passwd")}, "train/ant/evil.png"),
    "symlink-abs": ({}, {"train/ant/evil.png": (tarfile.SYMTYPE, "/etc/passwd")}, "train/ant/evil.png"),
    "hardlink-out": ({}, {"train/ant/evil.png": (tarfile.LNKTYPE, "../outside.png")}, "train/ant/evil.png"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_tar_members_are_refused(tmp_path, monkeypatch, case):
    extra, links, named = HOSTILE[case]
    # The hostile member comes last: it must be refused even after good ones were read.
    archive = make_tar(tmp_path / "evil.tar.gz", {**dataset_members(), **extra}, links=links)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(PipelineError, match="refusing archive member") as e:
        read_archive(archive, image_size=SIZE)
    assert named in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere


@pytest.mark.parametrize("name", ["../evil.png", "/evil.png", "train/../../evil.png"])
def test_hostile_zip_members_are_refused(tmp_path, name):
    members = {**dataset_members(), name: png(RED_BGR)}
    with pytest.raises(PipelineError, match="refusing archive member") as e:
        read_archive(make_zip(tmp_path / "evil.zip", members), image_size=SIZE)
    assert repr(name) in str(e.value)


def test_zip_symlink_escaping_is_refused(tmp_path):
    path = make_zip(tmp_path / "evil.zip", dataset_members())
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("train/ant/evil.png")
        info.create_system = 3  # Unix: external_attr holds st_mode
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "../../../etc/passwd")
    with pytest.raises(PipelineError, match="refusing archive member 'train/ant/evil.png'"):
        read_archive(path, image_size=SIZE)


def test_preprocess_stage_reads_image_folders(tmp_path):
    # The preprocess stage's entry point for preprocess.dataset=imagefolder.
    from imgclf.core.params import PreprocessParams
    from imgclf.data.preprocess import preprocess

    archive = make_tar(tmp_path / "source.tar", dataset_members("x/"), mode="w")
    stats = preprocess(archive, tmp_path / "processed", PreprocessParams(dataset="imagefolder", image_size=SIZE))
    assert stats["num_train"] == 6 and stats["num_test"] == 3 and stats["classes"] == 3


# --- Limits: members, archives, pixels -----------------------------------------------------


def noise_png(h: int, w: int) -> bytes:
    return encode(".png", np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))


BIG = noise_png(24, 24)  # ~1.8 kB: over a 1 kB member limit, and 576 pixels


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_member_over_the_size_limit_fails_naming_it_and_the_limit(tmp_path, fmt):
    members = {**dataset_members(), "train/ant/big.png": BIG}
    archive = make_tar(tmp_path / "d.tar", members, "w") if fmt == "tar" else make_zip(tmp_path / "d.zip", members)
    limits = Limits(member_bytes=1000, total_bytes=10**6)
    with pytest.raises(PipelineError) as e:
        read_archive(archive, image_size=SIZE, limits=limits)
    assert "train/ant/big.png: 0.0 MB uncompressed, over the limit of 0.001 MB (preprocess.max_member_mb)" in str(e.value)
    d = read_archive(archive, image_size=SIZE, limits=limits, bad_images="skip")
    check_solid_classes(d)  # left out; every other image kept


def test_link_to_a_member_over_the_limit_gives_its_reason(tmp_path):
    links = {"train/moth/link.png": (tarfile.SYMTYPE, "../ant/big.png")}
    archive = make_tar(tmp_path / "d.tar", {**dataset_members(), "train/ant/big.png": BIG}, "w", links=links)
    with pytest.raises(PipelineError) as e:
        read_archive(archive, image_size=SIZE, limits=Limits(member_bytes=1000, total_bytes=10**6))
    assert "2 file(s)" in str(e.value) and "train/moth/link.png: 0.0 MB uncompressed, over the limit" in str(e.value)


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_archive_over_the_total_limit_is_refused_at_the_member_that_crosses_it(tmp_path, fmt):
    members = {**dataset_members(), "train/ant/big.png": BIG, "train/ant/after.png": png(RED_BGR)}
    archive = make_tar(tmp_path / "d.tgz", members) if fmt == "tar" else make_zip(tmp_path / "d.zip", members)
    if fmt == "tar":  # headers and padding count too: the total reached where big.png ends
        with tarfile.open(archive) as tar:
            big = tar.getmember("train/ant/big.png")
        total = big.offset_data + big.size - 1
    else:
        total = sum(map(len, members.values())) - 1
    with pytest.raises(PipelineError) as e:
        read_archive(archive, image_size=SIZE, limits=Limits(member_bytes=10**6, total_bytes=total))
    named = "train/ant/big.png" if fmt == "tar" else "train/ant/after.png"
    assert f"more than {total / 1e6:g} MB uncompressed" in str(e.value) and repr(named) in str(e.value)
    assert "preprocess.max_total_mb" in str(e.value)


def test_oversized_tar_extended_header_is_refused_before_it_is_read(tmp_path):
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("train/ant/x.png")
        data = png(RED_BGR)
        info.size = len(data)
        info.pax_headers = {"comment": "x" * (2 << 20)}  # a 2 MB header, 2 kB compressed
        tar.addfile(info, io.BytesIO(data))
    assert archive.stat().st_size < 20_000
    with pytest.raises(PipelineError, match=r"refusing a pax header of 2,097,1.. bytes at byte 0 of the tar \(at most 1,048,576\)"):
        read_archive(archive, image_size=SIZE)


def test_zip_symlink_with_a_long_target_is_refused(tmp_path):
    path = make_zip(tmp_path / "evil.zip", dataset_members())
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("train/ant/link.png")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "a/" * 5000)
    with pytest.raises(PipelineError, match="refusing archive member 'train/ant/link.png': a symlink whose target is 10,000 bytes"):
        read_archive(path, image_size=SIZE)


# Every format's header reader (PNG, JPEG here; the rest through Pillow) against what OpenCV
# decodes: width and height, not swapped, on a non-square image.
HEADER_FORMATS = {
    "png": encode(".png", solid((1, 2, 3))[:5]),
    "jpg": encode(".jpg", solid((1, 2, 3))[:5]),
    "bmp": encode(".bmp", solid((1, 2, 3))[:5]),
    "webp": encode(".webp", solid((1, 2, 3))[:5]),
    "tif": encode(".tiff", solid((1, 2, 3), dtype=np.uint16)[:5]),
    "ppm": encode(".ppm", solid((1, 2, 3))[:5]),
    "pgm": encode(".pgm", np.zeros((5, SIZE), np.uint8)),
    "ras": encode(".ras", solid((1, 2, 3))[:5]),
}


def _pil_encoded(mode: str, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (SIZE, 5)).save(buf, fmt, **kwargs)
    return buf.getvalue()


_EXIF = Image.Exif()
_EXIF[0x0112] = 6  # rotated: OpenCV turns it upright, so only the pixel count is compared there
HEADER_FORMATS["progressive.jpg"] = _pil_encoded("RGB", "JPEG", progressive=True)
HEADER_FORMATS["palette.png"] = _pil_encoded("P", "PNG")
HEADER_FORMATS["palette.bmp"] = _pil_encoded("P", "BMP")
HEADER_FORMATS["exif.jpg"] = _pil_encoded("RGB", "JPEG", exif=_EXIF)


@pytest.mark.parametrize("name", HEADER_FORMATS)
def test_header_dimensions_match_the_decoded_image(name):
    data = HEADER_FORMATS[name]
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), decode.DECODE_FLAGS)
    assert image_dimensions(data) == (SIZE, 5)
    if name == "exif.jpg":
        assert decoded.shape[:2] == (SIZE, 5)  # turned upright: the same pixel count
    else:
        assert (decoded.shape[1], decoded.shape[0]) == (SIZE, 5)


@pytest.mark.parametrize("name", ["png", "jpg", "bmp", "tif"])
def test_image_over_the_pixel_limit_is_not_decoded(tmp_path, name):
    data = HEADER_FORMATS[name]  # 8 x 5 = 40 pixels
    assert decode_image(data, SIZE, name) is not None
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageFileError, match=r"8 x 5 pixels \(0.0 megapixels\), over the limit of 3.9e-05 megapixels; not decoded"):
        load_image_file(tmp_path / name, SIZE, max_pixels=39)
    assert load_image_file(tmp_path / name, SIZE, max_pixels=40).shape == (SIZE, SIZE, 3)


def test_pixel_limit_in_an_archive_fails_or_skips(tmp_path, caplog):
    archive = make_tar(tmp_path / "d.tar", {**dataset_members(), "test/ant/wide.png": noise_png(4, 20)}, "w")
    with pytest.raises(PipelineError) as e:
        read_archive(archive, image_size=SIZE, max_pixels=SIZE * SIZE)
    msg = str(e.value)
    assert "test/ant/wide.png: 20 x 4 pixels (0.0 megapixels), over the limit of 6.4e-05 megapixels (preprocess.max_megapixels)" in msg
    assert "raise the limit named" in msg
    with caplog.at_level(logging.WARNING, logger="imgclf.data.imagefolder"):
        check_solid_classes(read_archive(archive, image_size=SIZE, max_pixels=SIZE * SIZE, bad_images="skip"))
    assert "test/ant/wide.png" in caplog.text
