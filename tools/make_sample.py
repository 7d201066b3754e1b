"""Make a small, stratified, deterministic sample of an image-folder archive, as an image folder.

    python tools/make_sample.py ../shared/datasets/cifar10-jpeg.tar.gz data/sample/cifar10-sample

writes ``train/<class>/<file>`` and ``test/<class>/<file>`` (``val/`` if the source has no
``test/``) with the original bytes of each chosen file (no re-encoding), and beside them
``PROVENANCE`` (the source file's name, size, sha256 and md5, the selection rule, the counts
per class and the command that made it) and ``SHA256SUMS`` (each image's checksum). The
project commits the sample this makes of the CIFAR-10 JPEG archive, ``data/sample/cifar10-sample``:
``make demo`` and an offline ``make run`` train on it.

Selection: every class gets the same number of images (``--train`` / number of classes in
train, ``--test`` likewise). Within each (split, class) the files chosen are those whose
``sha256("<seed>:<path>")`` is smallest, ``<path>`` being the file's path below the top folder
(``train/cat/0001.jpg``). That depends only on the file names and the seed: the same source
gives the same sample, byte for byte, on any machine, whatever the archive's member order.

Folders, hidden files and files outside the split/class layout are skipped by the same rules
as the preprocess stage (:mod:`imgclf.data.imagefolder`). The output folder is replaced only once
the sample is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

from imgclf.core.errors import PipelineError
from imgclf.core.files import atomic_path, file_digest
from imgclf.data.archive import iter_members, open_archive
from imgclf.data.imagefolder import _layout  # the preprocess stage's layout rules, so both agree

DEFAULT_TRAIN, DEFAULT_TEST, DEFAULT_SEED = 2000, 500, 0
CHECKSUMS = "SHA256SUMS"


def selection_key(seed: int, path: str) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def list_images(source: Path) -> dict[tuple[str, str], list[str]]:
    """``(split, class) -> [path below the top folder, ...]`` of the source's files."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    with open_archive(source) as raw:
        for m in iter_members(raw, source):
            where = _layout(m.path) if m.kind == "file" else None
            if where is None:
                continue
            top, split, cls = where
            found[split, cls].append(m.path[len(top) + 1:] if top else m.path)
    return found


def choose(found: dict[tuple[str, str], list[str]], *, train: int, test: int, seed: int,
           source: Path) -> tuple[str, dict[tuple[str, str], list[str]]]:
    """The test split's folder name and the chosen paths per (split, class)."""
    splits = {split for split, _ in found}
    test_split = "test" if "test" in splits else "val"
    classes = sorted(cls for split, cls in found if split == "train")
    if not classes or test_split not in splits:
        raise PipelineError(f"{source}: expected train/<class>/<image> and test/<class>/<image> "
                            "(val/ may replace test/), optionally inside one top-level folder")
    chosen: dict[tuple[str, str], list[str]] = {}
    for split, total in (("train", train), (test_split, test)):
        if total % len(classes):
            raise PipelineError(f"--{'train' if split == 'train' else 'test'} {total} is not a multiple of "
                                f"the {len(classes)} classes: the sample takes the same number from each")
        per_class = total // len(classes)
        for cls in classes:
            paths = found.get((split, cls), [])
            if len(paths) < per_class:
                raise PipelineError(f"{source}: {split}/{cls} has {len(paths)} images; the sample needs "
                                    f"{per_class} per class")
            chosen[split, cls] = sorted(sorted(paths, key=lambda p: selection_key(seed, p))[:per_class])
    return test_split, chosen


def write_sample(source: Path, out: Path, chosen: dict[tuple[str, str], list[str]], provenance: str) -> None:
    """Copy the chosen files' bytes under ``out`` (replaced atomically), then PROVENANCE and
    SHA256SUMS (``sha256sum -c SHA256SUMS`` in the folder checks every image)."""
    wanted = {path for paths in chosen.values() for path in paths}
    with atomic_path(out, is_dir=True) as tmp, open_archive(source) as raw:
        written = 0
        for m in iter_members(raw, source):
            where = _layout(m.path) if m.kind == "file" else None
            if where is None:
                continue
            rel = m.path[len(where[0]) + 1:] if where[0] else m.path
            if rel in wanted:  # a later member of the same name replaces an earlier one, as tar does
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(m.read())
                written += dst.stat().st_size
        (tmp / "PROVENANCE").write_text(provenance)
        (tmp / CHECKSUMS).write_text("".join(f"{file_digest(tmp / rel, 'sha256')}  {rel}\n" for rel in sorted(wanted)))
    print(f"{out}: {len(wanted)} images, {written / 1e6:.2f} MB", file=sys.stderr)


def provenance_text(source: Path, *, test_split: str, chosen: dict[tuple[str, str], list[str]], seed: int,
                    command: str) -> str:
    classes = sorted({cls for _, cls in chosen})
    rows = [f"  {cls:<12} {len(chosen['train', cls]):>6} {len(chosen[test_split, cls]):>6}" for cls in classes]
    total_train = sum(len(chosen["train", c]) for c in classes)
    total_test = sum(len(chosen[test_split, c]) for c in classes)
    return "\n".join([
        "A stratified, deterministic sample of an image-folder archive, made by tools/make_sample.py.",
        "",
        f"source: {source.name}",
        f"source size: {source.stat().st_size} bytes",
        f"source sha256: {file_digest(source, 'sha256')}",
        f"source md5: {file_digest(source, 'md5')}",
        f"selection: in each (split, class), the files whose sha256(\"{seed}:<path>\") is smallest, "
        "<path> being the file's path below the archive's top folder (e.g. train/cat/0001.jpg); "
        "the same number per class; the original bytes, not re-encoded",
        f"seed: {seed}",
        f"images: {total_train} train + {total_test} {test_split}",
        f"per class:  {'class':<12} {'train':>6} {test_split:>6}",
        *rows,
        f"command: {command}",
        "",
    ])


def make_sample(source: Path, out: Path, *, train: int = DEFAULT_TRAIN, test: int = DEFAULT_TEST,
                seed: int = DEFAULT_SEED, command: str = "") -> dict[tuple[str, str], list[str]]:
    """Write the sample of ``source`` to ``out``; return the chosen paths per (split, class)."""
    test_split, chosen = choose(list_images(source), train=train, test=test, seed=seed, source=source)
    write_sample(source, out, chosen, provenance_text(source, test_split=test_split, chosen=chosen, seed=seed,
                                                      command=command))
    return chosen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="image-folder archive (.tar, .tar.gz, .zip)")
    ap.add_argument("output", type=Path, help="the sample folder to write (replaced if present)")
    ap.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training images, all classes together")
    ap.add_argument("--test", type=int, default=DEFAULT_TEST, help="test images, all classes together")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="changes which files are chosen")
    args = ap.parse_args(argv)
    # Names, not paths: the same source makes the same sample, PROVENANCE included, wherever
    # the files lie.
    command = shlex.join(["python", "tools/make_sample.py", args.source.name, args.output.name,
                          "--train", str(args.train), "--test", str(args.test), "--seed", str(args.seed)])
    t0 = time.perf_counter()
    try:
        make_sample(args.source, args.output, train=args.train, test=args.test, seed=args.seed, command=command)
    except PipelineError as e:
        print(f"error (make_sample): {e}", file=sys.stderr)
        sys.exit(1)
    print(f"made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
