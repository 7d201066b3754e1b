"""Which run `make run` makes on this machine: the full pipeline, or the demo on the sample.

    python tools/choose_run.py [--url URL] [--timeout SECONDS] [--sample DIR] [--sample-source FILE]

It decides before DVC runs, so each set of params still gives one result. For an http(s)
``download.url`` (from params.yaml, or ``--url``) it sends one HEAD request (a GET where the
server refuses HEAD) and waits at most ``--timeout`` seconds. Exit status:

- 0 ``full``: the source answered with a success, or it is a local path or file:// URL (the
  download stage says clearly if that is missing): `make run` runs ``dvc repro``;
- 3 ``demo``: the source does not answer, and the sample exists or its source archive does
  (``make demo`` makes it): one line says so, and `make run` runs ``make demo``;
- 4 ``neither``: one line says what to do;
- 2: params.yaml is invalid (one line names the key).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from imgclf.core import paths
from imgclf.core.errors import PipelineError
from imgclf.core.params import load_params
from imgclf.download.fetch import local_path

FULL, INVALID, DEMO, NEITHER = 0, 2, 3, 4


def probe(url: str, timeout: float) -> str | None:
    """None if ``url`` answers with a success; else why not, in a few words."""
    for method in ("HEAD", "GET"):
        req = urllib.request.Request(url, method=method, headers={"User-Agent": "imgclf-pipeline"})
        try:
            with urllib.request.urlopen(req, timeout=timeout):
                return None
        except urllib.error.HTTPError as e:
            if method == "HEAD" and e.code in (403, 405, 501):  # some servers refuse HEAD alone
                continue
            return f"HTTP {e.code} {e.reason}"
        except OSError as e:  # URLError (refused, no DNS, no route), timeouts, resets
            reason = getattr(e, "reason", e)
            return f"no answer in {timeout:g} s" if "timed out" in str(reason) else str(reason)
    return "no answer"


def choose(url: str, *, timeout: float, sample: Path, sample_source: Path | None) -> tuple[int, str]:
    """The exit status and the line to print ('' for the full run)."""
    if local_path(url) is not None:
        return FULL, ""
    why = probe(url, timeout)
    if why is None:
        return FULL, ""
    if (sample / "PROVENANCE").is_file() or (sample_source is not None and sample_source.is_file()):
        return DEMO, f"make run: cannot reach {url} ({why}); running the demo on the CIFAR-10 sample instead"
    return NEITHER, (
        f"make run: cannot reach {url} ({why}), and the sample the project commits is missing at {sample} "
        f"(git checkout -- {sample} brings it back){f' with no archive to make it from at {sample_source}' if sample_source else ''}: "
        "connect to the internet, or run make run SAMPLE_SOURCE=/path/to/cifar10-jpeg.tar.gz, "
        "or point the pipeline at a copy: dvc exp run -S download.url=/path/to/cifar-10-python.tar.gz"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="the source to check (default: download.url in params.yaml)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    ap.add_argument("--sample", type=Path, default=Path("data/sample/cifar10-sample"), help="the demo's sample")
    ap.add_argument("--sample-source", type=Path, default=None,
                    help="an archive tools/make_sample.py can make the sample from, where it is missing")
    args = ap.parse_args(argv)
    try:
        url = args.url or load_params(paths.PARAMS).download.url
        status, line = choose(url, timeout=args.timeout, sample=args.sample, sample_source=args.sample_source)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return INVALID
    if line:
        print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
