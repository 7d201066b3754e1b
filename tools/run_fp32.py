"""Run a Python script with autocast turned off, so it computes in fp32.

For side-by-side timings on CPUs without bf16 kernels (no AVX-512 BF16 or AMX), where
oneDNN emulates bf16 and a bf16-autocast script runs many times slower than in fp32 (the
airbench94 port: about 90 to 180 s per step against 10.0 s, on a 2-core AVX2 EPYC); the
pipeline's ``precision: auto`` picks fp32 on such a CPU, and this gives a peer the same.

    CACHE=data/processed RUNS=1 EPOCHS=9.9 python tools/run_fp32.py ../shared/anchors/airbench94_cpu.py
"""

import contextlib
import runpy
import sys

import torch


def _no_autocast(*args, **kwargs):
    return contextlib.nullcontext()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tools/run_fp32.py SCRIPT [ARGS...]")
    torch.autocast = _no_autocast
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
