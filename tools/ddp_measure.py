"""The measurements of docs/distributed.md: images/s of one epoch per process layout, the time
of gloo all-reduces, and the per-step costs of synchronised batch norm and augmentation.

    python tools/ddp_measure.py ips --threads 2 --cache data/processed              # 1 process x 2 threads
    torchrun --standalone --nproc-per-node 2 tools/ddp_measure.py ips --threads 1   # 2 processes x 1 thread
    torchrun --standalone --nproc-per-node 2 tools/ddp_measure.py allreduce 211946 129 65 1
    torchrun --standalone --nproc-per-node 2 tools/ddp_measure.py parts --cache data/processed

Each prints lines starting with RESULT (from rank 0). Run `uptime` beside them: on a shared
machine the load changes the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as td
from torch import nn


def images_per_s(cache: Path, threads: int) -> None:
    """One epoch of seed_cnn_bn, batch 128, precision auto, on the CPU, through train()."""
    from imgclf.core.params import ModelParams, TrainParams
    from imgclf.train.loop import TrainPaths, train

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    train_params = TrainParams(epochs=1, batch_size=128, device="cpu", precision="auto", threads=threads, processes=processes)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        metrics = train(ModelParams(arch="seed_cnn_bn"), train_params,
                        TrainPaths(cache, out / "m.pt", out / "t.json", out / "c.csv", out / "ck.pt", None, None))
    if metrics:
        print("RESULT", json.dumps({"threads": threads, "processes": processes, **metrics}))


def _init() -> None:
    torch.set_num_threads(1)
    td.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def allreduce(sizes: list[int], repeats: int = 300) -> None:
    """Median and 10th/90th percentiles of one all-reduce of each size (float32 elements)."""
    _init()
    for n in sizes:
        x = torch.randn(n)
        for _ in range(20):
            td.all_reduce(x)
        times = []
        for _ in range(repeats):
            td.barrier()
            t0 = time.perf_counter()
            td.all_reduce(x)
            times.append(time.perf_counter() - t0)
        if td.get_rank() == 0:
            q = statistics.quantiles(times, n=10)
            print(f"RESULT allreduce {n} floats ({4 * n} B): median {statistics.median(times) * 1e6:.0f} us, "
                  f"p10 {q[0] * 1e6:.0f} us, p90 {q[-1] * 1e6:.0f} us")
    td.destroy_process_group()


def parts(cache: Path) -> None:
    """seed_cnn_bn's three batch-norm layers on a 64-image share, plain against synchronised
    (forward and backward, all-reduces included), and augmenting a whole epoch, one thread."""
    from imgclf.cache.dataset import load_cache
    from imgclf.train.sync_batchnorm import convert
    from imgclf.train.augment import Augmenter

    _init()
    shapes = [(64, 32, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]

    def step_time(sync: bool) -> float:
        layers = [nn.BatchNorm2d(s[1]).train() for s in shapes]
        if sync:
            layers = [convert(nn.Sequential(layer), torch.device("cpu"))[0] for layer in layers]
        xs = [torch.randn(*s).contiguous(memory_format=torch.channels_last).requires_grad_() for s in shapes]
        times = []
        for _ in range(60):
            td.barrier()
            t0 = time.perf_counter()
            for layer, x in zip(layers, xs):
                layer(x).sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[10:])

    plain, sync = step_time(False), step_time(True)
    if td.get_rank() == 0:
        print(f"RESULT 3 BN layers fwd+bwd, 64 images, 1 thread: plain {plain * 1e3:.2f} ms, "
              f"synchronised {sync * 1e3:.2f} ms per step")
        train_split = load_cache(cache, splits=("train",)).train
        augmenter = Augmenter(train_split.images, crop_padding=4, flip=True)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        augmenter(torch.randperm(len(train_split), generator=g), g)
        print(f"RESULT augmenting the {len(train_split):,}-image epoch, 1 thread: {time.perf_counter() - t0:.2f} s")
    td.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ips")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cache", type=Path, default=Path("data/processed"))
    p = sub.add_parser("allreduce")
    p.add_argument("sizes", type=int, nargs="+")
    p = sub.add_parser("parts")
    p.add_argument("--cache", type=Path, default=Path("data/processed"))
    args = parser.parse_args()
    if args.what == "ips":
        images_per_s(args.cache, args.threads)
    elif args.what == "allreduce":
        allreduce(args.sizes)
    else:
        parts(args.cache)


if __name__ == "__main__":
    main()
