"""Repack an image-folder archive (train/<class>/*, test/<class>/*) as cifar-10-python.tar.gz.

For end-to-end runs of the official-format path on real images where the official download
is out of reach:

    python tools/make_cifar_archive.py ../shared/datasets/cifar10-jpeg.tar.gz /tmp/cifar10/cifar-10-python.tar.gz

The output has the official layout, keys, dtypes and Python 2 pickling; only its md5 differs
(the pixels were re-encoded as JPEG by the mirror). Prints the md5 to put in download.md5.
"""

import argparse
import sys
import time
from pathlib import Path

from imgclf.bench.cifar_writer import write_archive
from imgclf.core.files import file_digest
from imgclf.data.imagefolder import read_archive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="image-folder archive (.tar, .tar.gz, .zip)")
    ap.add_argument("output", type=Path, help="where to write cifar-10-python.tar.gz")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ds = read_archive(args.source, image_size=32, bad_images="fail", workers=0)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_archive(args.output, ds.train, ds.test, ds.classes)
    print(f"{args.output}: {len(ds.train)} train + {len(ds.test)} test images, "
          f"{len(ds.classes)} classes, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"md5 {file_digest(args.output)}")


if __name__ == "__main__":
    main()
