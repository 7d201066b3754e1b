"""``python -m imgclf.bench``: parse the flags, run the bench, print the report, write the JSON."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .. import bench
from ..core.errors import PipelineError
from ..core.files import write_json
from .report import format_report
from .run import run_bench


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imgclf.bench", description=bench.__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, help="official-format cifar-10-python.tar.gz (default: the one file in data/raw/)")
    ap.add_argument("--project", type=Path, help="an up-to-date DVC project to time a no-op `dvc repro` in")
    ap.add_argument("--quick", action="store_true", help="small synthetic data and few steps: seconds, for the tests")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = ap.parse_args(argv)
    if args.quick and args.archive is not None:
        ap.error("--quick benchmarks its own small synthetic data; drop --archive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", datefmt="%H:%M:%S")
    try:
        command = " ".join(["python -m imgclf.bench", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
        results = run_bench(archive=args.archive, project=args.project, quick=args.quick, device_name=args.device, command=command)
    except PipelineError as e:
        print(f"error (bench): {e}", file=sys.stderr)
        sys.exit(1)
    report = format_report(results)
    results["report"] = report
    if args.json is not None:
        write_json(args.json, results)
    print(report)
