"""`make bench`: how close the pipeline trains to the machine's limit, measured side by side.

One command, one run, one machine: the pipeline's training throughput (the code path of
:func:`imgclf.train.train`), the same model fed the classic tutorial way (torchvision's
``CIFAR10`` through a ``DataLoader``), the same model stepping on one batch already on the
device (the ceiling, no data path), and the FLOP ceiling from large matrix products. Then the
one-off costs: preprocessing, loading the cache, a no-op ``dvc repro`` and one full epoch.

    python -m imgclf.bench [--archive PATH] [--project DIR] [--quick] [--json OUT] [--device auto|cpu|cuda]

Every throughput is the median of >= 5 timed repeats after warm-up. The README (Speed) explains
each row and holds a measured table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import cifar, models, paths
from .dataset import Cache, Split, timed_load
from .download import find_archive
from .files import PipelineError, write_json
from .params import DataParams, ModelParams, PreprocessParams, TrainParams
from .preprocess import preprocess
from .runtime import configure_threads, cpu_supports_bf16, resolve_device, resolve_precision
from .train import TrainPaths, TrainStep, epoch_batches, make_step, run_steps, train
from .transforms import Augmenter, tutorial_transform

log = logging.getLogger("imgclf.bench")


# --- What is measured --------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A model and the train params it is benchmarked with (as in params.yaml / the README)."""

    name: str
    arch: str
    width: int  # resnet_fast only
    batch: int
    other_batch: int  # the batch-size comparison row
    lr: float
    label_smoothing: float

    @property
    def model_params(self) -> ModelParams:
        return ModelParams(arch=self.arch, width=self.width)

    @property
    def title(self) -> str:
        return f"{self.arch} w{self.width}" if self.arch == "resnet_fast" else self.arch


RECIPES = (
    # The tutorial's network at the params.yaml batch size.
    Recipe("seed_cnn", "seed_cnn", 64, batch=128, other_batch=512, lr=0.05, label_smoothing=0.0),
    # The fast CPU recipe: `dvc exp run -S model.arch=resnet_fast -S model.width=32
    # -S train.batch_size=512 -S train.lr=0.2 -S train.label_smoothing=0.2`.
    Recipe("fast", "resnet_fast", 32, batch=512, other_batch=128, lr=0.2, label_smoothing=0.2),
)


@dataclass(frozen=True)
class Config:
    recipe: Recipe
    batch: int
    precision: str  # fp32 | bf16 (autocast)
    channels_last: bool
    threads: int  # 0 = one per usable core (configure_threads)


@dataclass(frozen=True)
class Settings:
    """How hard to measure: --quick trades precision of the figures for a run of seconds."""

    repeats: int = 5  # timed repeats; the median is reported
    min_seconds: float = 1.0  # a timed repeat runs at least this long (whole steps)
    matmul_size: int = 4096  # square matrices for the peak-FLOP/s measurement
    num_train: int = 50_000  # synthetic data only
    num_test: int = 10_000
    batch_divisor: int = 1  # --quick: smaller batches so every row takes a second


FULL = Settings()
QUICK = Settings(repeats=5, min_seconds=0.0, matmul_size=512, num_train=512, num_test=128, batch_divisor=8)


@dataclass
class Trainee:
    """A fresh model and its training step, built as train() builds them for ``cfg``."""

    model: models.Classifier
    step: TrainStep
    t: TrainParams
    fmt: torch.memory_format

    @classmethod
    def build(cls, cfg: Config, device: torch.device, mean: list[float], std: list[float], num_classes: int, image_size: int) -> Trainee:
        r = cfg.recipe
        t = TrainParams(
            batch_size=cfg.batch, lr=r.lr, label_smoothing=r.label_smoothing, precision=cfg.precision,
            channels_last=cfg.channels_last, device=device.type, threads=cfg.threads,
        )
        fmt = torch.channels_last if t.channels_last else torch.contiguous_format
        torch.manual_seed(t.seed)
        args = models.arch_args(r.arch, num_classes=num_classes, image_size=image_size, width=r.width)
        model = models.build(r.arch, args, mean, std).to(device, memory_format=fmt).train()
        # The schedule of a 10-epoch CIFAR-10 run: the few hundred steps measured stay in its
        # warm-up, at a small learning rate. Speed does not depend on the rate; divergence
        # (which stops a step with an error, as in train()) cannot happen.
        steps_per_epoch = 50_000 // cfg.batch
        step = make_step(model, t, device, resolve_precision(t.precision, device), 10 * steps_per_epoch, steps_per_epoch)
        return cls(model, step, t, fmt)


# Each feeder runs `steps` training steps and returns the number of images trained on.
Feeder = Callable[[int], int]


def pipeline_feeder(tr: Trainee, x_train: torch.Tensor, y_train: torch.Tensor, generator: torch.Generator) -> Feeder:
    """train.py's data path: permute, augment the whole epoch in one batched pass on the
    device, then slice batches. A timed repeat of k steps is an epoch of k batches, so the
    per-epoch augmentation is paid in proportion, as in a full epoch."""
    n, b = len(x_train), tr.t.batch_size
    augmenter = Augmenter(x_train, crop_padding=tr.t.augment.crop_padding, flip=tr.t.augment.flip)

    def run(steps: int) -> int:
        done = 0
        while done < steps:
            k = min(steps - done, n // b)
            batches = epoch_batches(augmenter, y_train, batch=b, steps=k, generator=generator, memory_format=tr.fmt)
            run_steps(tr.step, batches, k, epoch=0)
            done += k
        return steps * b

    return run


def compute_feeder(tr: Trainee, x_train: torch.Tensor, y_train: torch.Tensor) -> Feeder:
    """No data path: the same step on one fixed batch already on the device, in the
    model's memory format. The ceiling of this model at this batch size on this machine."""
    b = tr.t.batch_size
    batch = (x_train[:b].contiguous(memory_format=tr.fmt), y_train[:b].clone())

    def run(steps: int) -> int:
        run_steps(tr.step, itertools.repeat(batch), steps, epoch=0)
        return steps * b

    return run


class TutorialCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 Dataset over a local copy of the official-format archive.

    torchvision checks each batch file against the md5 sums of the official download. The
    archive benchmarked here has the official format but need not have those bytes:
    tools/make_cifar_archive.py repacks re-encoded images, and without an archive the bench
    writes a synthetic one. Speed, not provenance, is measured here; the same archive was
    read just before by :func:`imgclf.cifar.read_archive`, which refuses any pickle holding
    more than arrays, lists and dicts, so torchvision's plain ``pickle.load`` reads only
    vetted files. Hence: the sums are not checked, only that the files exist.
    """

    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # None: existence only

    def _check_integrity(self) -> bool:
        return True


def extract_batches(archive: Path, dest: Path) -> Path:
    """Unpack the archive's batch folder (what torchvision's CIFAR10 reads) under ``dest``."""
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.removeprefix("./").startswith(cifar.FOLDER + "/")]
        tar.extractall(dest, members=members, filter="data")
    return dest


def classic_feeder(tr: Trainee, root: Path, mean: list[float], std: list[float], workers: int, image_size: int) -> tuple[Feeder, Callable[[], None]]:
    """The tutorial's way (§1): a Dataset returning one PIL image at a time, transformed per
    sample, collated by a DataLoader, copied to the device per batch. The per-sample
    transform does the pipeline's augmentation (reflect-padded crop, flip) and then the
    tutorial's ToTensor + Normalize, so both paths do the same work. The normalised floats
    go to the network inside the Classifier (``model.net``), past its own normalisation."""
    from torchvision.transforms import v2

    aug, b, device = tr.t.augment, tr.t.batch_size, tr.step.device
    ops: list[Any] = []
    if aug.crop_padding:
        ops.append(v2.RandomCrop(image_size, padding=aug.crop_padding, padding_mode="reflect"))
    if aug.flip:
        ops.append(v2.RandomHorizontalFlip())
    with warnings.catch_warnings():  # the official pickles name numpy.core (NumPy 2: a shim)
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = TutorialCIFAR10(str(root), train=True, transform=v2.Compose([*ops, tutorial_transform(mean, std)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=b, shuffle=True, num_workers=workers, drop_last=True)
    step = replace(tr.step, forward=tr.model.net)

    def forever() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for x, y in loader:  # as the tutorial: inputs.to(device), labels.to(device)
                yield x.to(device).contiguous(memory_format=tr.fmt), y.to(device)

    batches = forever()

    def run(steps: int) -> int:
        run_steps(step, batches, steps, epoch=0)
        return steps * b

    return run, batches.close  # closing the generator ends the worker processes


# --- Timing --------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for queued device work: a GPU runs asynchronously, so the clock may be read only
    after a synchronize (CPU work is synchronous already)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def measure(run: Feeder, sync: Callable[[], None], s: Settings) -> dict[str, Any]:
    """Warm up, pick whole steps per repeat for >= s.min_seconds, time s.repeats repeats."""
    run(1)  # first step: lazy initialisation, kernel selection, allocator growth
    sync()
    steps = 1
    if s.min_seconds > 0:
        t0 = time.perf_counter()
        run(1)
        sync()
        one = time.perf_counter() - t0
        steps = min(1000, max(1, math.ceil(s.min_seconds / max(one, 1e-6))))
        if steps > 1:
            run(steps)  # warm at the repeat's size (an epoch of that many batches)
    rates = []
    for _ in range(s.repeats):
        sync()
        t0 = time.perf_counter()
        images = run(steps)
        sync()
        rates.append(images / (time.perf_counter() - t0))
    median = statistics.median(rates)
    return {"images_per_s": median, "repeats": rates, "steps_per_repeat": steps, "spread": (max(rates) - min(rates)) / median}


def peak_flops(dtype: torch.dtype, device: torch.device, n: int, repeats: int, sync: Callable[[], None]) -> float:
    """FLOP/s of an n x n matrix product (2 n^3 FLOPs): what the hardware sustains at best."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    sync()
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def train_flops_per_image(recipe: Recipe, mean: list[float], std: list[float], num_classes: int, image_size: int) -> float:
    """Forward + backward FLOPs of one training image, counted by FlopCounterMode.

    It counts matrix products and convolutions (2 FLOPs per multiply-add); batch norm,
    activations, pooling and the optimiser are not counted, so the achieved fraction it
    gives is a lower bound. The count depends on shapes only, not on dtype or device."""
    args = models.arch_args(recipe.arch, num_classes=num_classes, image_size=image_size, width=recipe.width)
    model = models.build(recipe.arch, args, mean, std).train()
    n = 4
    x = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / n


def denormal_cost(repeats: int, n: int = 256) -> dict[str, float]:
    """Seconds of an n x n matrix product whose products underflow to denormals, with
    flush-to-zero off, then on.

    Denormals (|x| < 1.2e-38 in fp32) appear late in training, when small gradients
    underflow; x86 handles them in slow microcode unless flush-to-zero is set, which
    :func:`imgclf.runtime.configure_threads` does. A fresh model has none, so the effect is
    shown on matrices made to produce them rather than in the throughput rows."""
    a = torch.full((n, n), 1e-20)  # normal floats whose products (1e-40) are denormal
    out = torch.empty(n, n)
    result: dict[str, float] = {"matmul": n}
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                torch.mm(a, a, out=out)
                times.append(time.perf_counter() - t0)
            result["flush_on" if flush else "flush_off"] = statistics.median(times[1:])
    finally:
        torch.set_flush_denormal(True)  # the pipeline's setting
    result["slowdown"] = result["flush_off"] / result["flush_on"]
    return result


# --- One-off costs ---------------------------------------------------------------------------


def dvc_noop(project: Path) -> dict[str, Any]:
    """Median seconds of three `dvc repro` runs in an up-to-date project (nothing to run)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    dvc = [sys.executable, "-m", "dvc"]
    try:
        status = subprocess.run([*dvc, "status", "--quiet"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"skipped": f"`dvc status` failed in {project}: {e}"}
    if status.returncode != 0:
        return {"skipped": f"{project} is not up to date (`dvc status` lists changes), so `dvc repro` would not be a no-op"}
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run([*dvc, "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
        runs.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return {"skipped": f"`dvc repro` failed in {project}: {proc.stderr.strip()[-300:]}"}
        if "Running stage" in proc.stdout:
            return {"skipped": f"`dvc repro` ran stages in {project}: not a no-op"}
    return {"seconds": statistics.median(runs), "runs": runs, "project": str(project)}


def train_epoch(recipe: Recipe, batch: int, cache_dir: Path, out: Path, device: torch.device) -> dict[str, Any]:
    """One epoch of :func:`imgclf.train.train` itself, on the whole preprocessed cache."""
    t = TrainParams(
        epochs=1, batch_size=batch, lr=recipe.lr, label_smoothing=recipe.label_smoothing,
        device=str(device), precision="auto", channels_last=True, threads=0,
    )
    tp = TrainPaths(cache_dir, out / "trained.pt", out / "train.json", out / "train_curve.csv", out / "train_ckpt.pt", None)
    t0 = time.perf_counter()
    metrics = train(recipe.model_params, t, tp)
    return {
        "recipe": recipe.name, "batch": batch, "precision": "auto", "channels_last": True,
        "wall_seconds": time.perf_counter() - t0,  # model build, epoch, test pass, export
        "seconds": metrics["train_seconds"],  # the epoch and its test pass, as train.py logs it
        "images_per_s": metrics["images_per_s"],  # the epoch's training steps alone
        "test_acc": metrics["test_acc"],
    }


# --- Data --------------------------------------------------------------------------------------


def synthesize_archive(path: Path, num_train: int, num_test: int) -> None:
    """Random uint8 CIFAR-shaped images written as an official-format archive."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cifar.write_archive(path, split(num_train), split(num_test), classes)


def choose_archive(archive: Path | None, quick: bool, tmp: Path, s: Settings) -> tuple[Path, str | None]:
    """The archive to benchmark and, when synthetic data stands in, why."""
    if archive is not None:
        if not archive.is_file():
            raise PipelineError(f"--archive {archive}: no such file")
        return archive, None
    why = None
    if quick:
        why = "--quick"
    else:
        try:
            return find_archive(paths.RAW_DIR), None
        except PipelineError:
            why = f"no archive in {paths.RAW_DIR}/ (run `dvc repro download`, or pass --archive)"
    path = tmp / "synthetic" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    synthesize_archive(path, s.num_train, s.num_test)
    return path, f"SYNTHETIC random data ({s.num_train} train + {s.num_test} test images): {why}"


# --- The whole benchmark -----------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # The instruction sets behind the fp32 and bf16 peaks (AMX: bf16 matrix tiles).
        "cpu_matrix_isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # fp32 convolutions on a GPU run as TF32 when cuDNN allows it (the default), matmuls
        # not: fp32 rows can then pass the fp32 matmul "peak".
        "cuda_tf32": _tf32_flags() if device.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "busy_elsewhere": busy_elsewhere(),
    }


def _tf32_flags() -> dict[str, bool]:
    with warnings.catch_warnings():  # newer torch deprecates these flags for fp32_precision
        warnings.simplefilter("ignore")
        return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def busy_elsewhere(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs that other processes kept busy during ``seconds`` of sleep here
    (from /proc/stat; None where there is none). Training threads that share cores with
    another job wait for each other at every parallel region, so a busy machine can slow
    the figures far more than this fraction suggests."""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    try:
        busy0, total0 = busy_and_total()
        time.sleep(seconds)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def _bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def _row_id(kind: str, cfg: Config, workers: int | None = None) -> str:
    parts = [cfg.recipe.name, kind, cfg.precision, "cl" if cfg.channels_last else "nchw", f"b{cfg.batch}", f"t{cfg.threads}"]
    if workers is not None:
        parts.append(f"w{workers}")
    return "/".join(parts)


def plan(recipe: Recipe, device: torch.device, s: Settings, cores: int) -> list[tuple[str, Config, int | None]]:
    """(kind, config, DataLoader workers) for each throughput row of one recipe; the first
    row is the recipe as `dvc repro` trains it (precision auto, channels_last)."""
    best = "bf16" if _bf16_available(device) else "fp32"
    ref = Config(recipe, recipe.batch // s.batch_divisor, best, channels_last=True, threads=0)
    rows: list[tuple[str, Config, int | None]] = [
        ("pipeline", ref, None), ("compute", ref, None), ("classic", ref, 0), ("classic", ref, 2),
    ]
    variants = [(best, False), ("fp32", True), ("fp32", False)]
    for precision, cl in dict.fromkeys(variants):
        if (precision, cl) != (best, True):
            cfg = replace(ref, precision=precision, channels_last=cl)
            rows += [("pipeline", cfg, None), ("compute", cfg, None)]
    rows.append(("pipeline", replace(ref, batch=recipe.other_batch // s.batch_divisor), None))
    if device.type == "cpu" and cores > 1:
        rows.append(("pipeline", replace(ref, threads=1), None))
    return rows


@dataclass
class Bench:
    """What every throughput row shares: the device, the cached data, the ceilings."""

    device: torch.device
    settings: Settings
    cache: Cache
    x_train: torch.Tensor  # the whole uint8 train split, on the device (as train.py holds it)
    y_train: torch.Tensor
    classic_root: Path  # the archive's batch files, for torchvision's CIFAR10
    flops_per_image: dict[str, float]
    peaks: dict[tuple[str, int], float]  # (precision, threads; 0 = all) -> FLOP/s

    def row(self, kind: str, cfg: Config, workers: int | None) -> dict[str, Any]:
        """Measure one throughput row; the threads setting applies to it alone."""
        configure_threads(cfg.threads)
        try:
            tr = Trainee.build(cfg, self.device, self.cache.mean, self.cache.std, len(self.cache.classes), self.cache.image_size)
            close = None
            if kind == "pipeline":
                feeder = pipeline_feeder(tr, self.x_train, self.y_train, torch.Generator(self.device).manual_seed(0))
            elif kind == "compute":
                feeder = compute_feeder(tr, self.x_train, self.y_train)
            else:
                feeder, close = classic_feeder(tr, self.classic_root, self.cache.mean, self.cache.std, workers or 0, self.cache.image_size)
            try:
                timing = measure(feeder, synchronizer(self.device), self.settings)
            finally:
                if close is not None:
                    close()
            threads = torch.get_num_threads()
        finally:
            configure_threads(0)
        peak = self.peaks.get((cfg.precision, cfg.threads), self.peaks[(cfg.precision, 0)])
        return {
            "id": _row_id(kind, cfg, workers), "recipe": cfg.recipe.name, "model": cfg.recipe.title, "kind": kind,
            "precision": cfg.precision, "channels_last": cfg.channels_last, "batch": cfg.batch,
            "threads": threads, "workers": workers, **timing,
            "peak_fraction": timing["images_per_s"] * self.flops_per_image[cfg.recipe.name] / peak,
        }


def measure_peaks(device: torch.device, s: Settings, all_threads: int) -> list[dict[str, Any]]:
    """The matmul peak per precision, with all threads and (on a multi-core CPU) one."""
    sync = synchronizer(device)
    precisions = ["fp32"] + (["bf16"] if _bf16_available(device) else [])
    n = s.matmul_size * (2 if device.type == "cuda" else 1)  # a GPU needs more work to fill
    out = []
    for threads in ([0, 1] if device.type == "cpu" and all_threads > 1 else [0]):
        configure_threads(threads)
        for p in precisions:
            flops = peak_flops(torch.bfloat16 if p == "bf16" else torch.float32, device, n, s.repeats, sync)
            out.append({"precision": p, "threads": threads, "flops_per_s": flops, "matmul": n})
            log.info("peak %s, %d thread(s): %.1f GFLOP/s (%d^2 matmul)", p, torch.get_num_threads(), flops / 1e9, n)
    configure_threads(0)
    return out


def run_bench(*, archive: Path | None, project: Path | None, quick: bool, device_name: str, command: str = "") -> dict[str, Any]:
    """Measure everything; return the results (what --json writes)."""
    started = time.perf_counter()
    s = QUICK if quick else FULL
    device = resolve_device(device_name)
    all_threads = configure_threads(0)
    results: dict[str, Any] = {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(device), "quick": quick, "settings": asdict(s),
    }
    log.info("machine: %s", results["machine"])

    with tempfile.TemporaryDirectory(prefix="imgclf-bench-") as tmp_name:
        tmp = Path(tmp_name)
        archive, synthetic = choose_archive(archive, quick, tmp, s)
        results["data"] = {"archive": str(archive), "synthetic": synthetic is not None, "note": synthetic}
        if synthetic:
            log.warning("%s", synthetic)

        # Preprocess the whole archive, then load the cache as training does.
        cache_dir = tmp / "processed"
        stats = preprocess(archive, cache_dir, DataParams(), PreprocessParams())
        cache, load_seconds = timed_load(cache_dir)
        results["data"] |= {"num_train": len(cache.train), "num_test": len(cache.test)}
        results["preprocess"] = {"seconds": stats["seconds"], "cache_bytes": stats["cache_bytes"], "load_seconds": load_seconds}
        log.info("preprocess %.2f s, cache %.1f MB, load %.3f s", stats["seconds"], stats["cache_bytes"] / 1e6, load_seconds)

        if project is not None:
            log.info("timing a no-op `dvc repro` in %s (3 runs)", project)
            results["dvc_noop"] = dvc_noop(project)
        else:
            results["dvc_noop"] = {"skipped": "no --project given"}

        # The FLOP ceiling: training FLOPs per image, and what the hardware sustains.
        results["flops_per_image"] = {
            r.name: train_flops_per_image(r, cache.mean, cache.std, len(cache.classes), cache.image_size) for r in RECIPES
        }
        results["peak"] = measure_peaks(device, s, all_threads)
        results["denormal"] = denormal_cost(s.repeats) if device.type == "cpu" else None

        bench = Bench(
            device, s, cache, cache.train.images.to(device), cache.train.labels.to(device),
            extract_batches(archive, tmp / "torchvision"), results["flops_per_image"],
            {(p["precision"], p["threads"]): p["flops_per_s"] for p in results["peak"]},
        )
        rows: list[dict[str, Any]] = []
        ratios: list[dict[str, Any]] = []
        for recipe in RECIPES:
            mine: list[dict[str, Any]] = []
            for kind, cfg, workers in plan(recipe, device, s, all_threads):
                row = bench.row(kind, cfg, workers)
                row["reference"] = (mine[0] if mine else row)["id"]
                row["ratio"] = row["images_per_s"] / (mine[0] if mine else row)["images_per_s"]
                mine.append(row)
                log.info("%-40s %9.1f img/s  (%d x %d steps, spread %.0f%%)", row["id"], row["images_per_s"],
                         s.repeats, row["steps_per_repeat"], 100 * row["spread"])
            rows += mine
            ratios += _ratios(mine)
        results["throughput"] = rows
        del bench  # on a GPU, frees its copy of the data before train() makes its own

        # One real epoch of train() itself on the whole cache: the fast recipe.
        fast = RECIPES[-1]
        batch = fast.batch // s.batch_divisor
        log.info("one epoch of imgclf.train.train (%s, batch %d) on %d images", fast.title, batch, len(cache.train))
        epoch = results["train_epoch"] = train_epoch(fast, batch, cache_dir, tmp / "train", device)
        twin = next(r for r in rows if r["recipe"] == fast.name)  # the recipe's pipeline row
        ratios.append(_ratio("train() epoch / bench pipeline", "train_epoch", epoch["images_per_s"], twin["id"], twin["images_per_s"], "a/b", fast.name))
        results["ratios"] = ratios

    if results["machine"]["load_average"] is not None:
        results["machine"]["load_average_end"] = list(os.getloadavg())
    results["machine"]["busy_elsewhere_end"] = busy_elsewhere()
    results["total_seconds"] = time.perf_counter() - started
    return results


def _ratio(name: str, a: str, a_value: float, b: str, b_value: float, formula: str, recipe: str) -> dict[str, Any]:
    value = a_value / b_value if formula == "a/b" else 1 - a_value / b_value
    return {"name": name, "recipe": recipe, "formula": formula, "a": a, "a_value": a_value, "b": b, "b_value": b_value, "value": value}


def _ratios(mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One recipe's derived ratios: data-path overhead of each pipeline row with a
    compute-only twin, pipeline/classic, and the gain of all threads over one."""
    recipe = mine[0]["recipe"]
    by_id = {r["id"]: r for r in mine}
    ref = mine[0]
    out = []
    for r in mine:
        if r["kind"] == "pipeline":
            twin = by_id.get(r["id"].replace("/pipeline/", "/compute/"))
            if twin is not None:
                out.append(_ratio("data-path overhead", r["id"], r["images_per_s"], twin["id"], twin["images_per_s"], "1-a/b", recipe))
                r["overhead"] = out[-1]["value"]
                r["overhead_noise"] = max(r["spread"], twin["spread"]) / 2  # half the wider spread
        if r["kind"] == "classic":
            out.append(_ratio(f"pipeline / classic (workers {r['workers']})", ref["id"], ref["images_per_s"], r["id"], r["images_per_s"], "a/b", recipe))
            r["pipeline_over_classic"] = out[-1]["value"]
        if r["kind"] == "pipeline" and r["threads"] == 1 and ref["threads"] > 1:
            out.append(_ratio(f"{ref['threads']} threads / 1 thread", ref["id"], ref["images_per_s"], r["id"], r["images_per_s"], "a/b", recipe))
    return out


# --- Report --------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _describe(r: dict[str, Any]) -> str:
    layout = "channels_last" if r["channels_last"] else "NCHW"
    what = {"pipeline": "pipeline", "compute": "compute only", "classic": f"classic DataLoader, {r['workers']} workers"}[r["kind"]]
    threads = f", {_plural(r['threads'], 'thread')}" if r["kind"] == "pipeline" else ""
    return f"{what}: {r['precision']}, {layout}, batch {r['batch']}{threads}"


def _notes(r: dict[str, Any], results: dict[str, Any]) -> str:
    notes = []
    if r["id"] == r["reference"]:
        notes.append("the recipe as `dvc repro` trains it")
    if "overhead" in r:
        noise = "" if abs(r["overhead"]) > r["overhead_noise"] else ", within the repeats' spread"
        notes.append(f"data-path overhead {100 * r['overhead']:.1f}% (1 - pipeline/compute only{noise})")
    if r["kind"] == "compute":
        notes.append("ceiling: one fixed batch on the device")
    if "pipeline_over_classic" in r:
        notes.append(f"pipeline/classic = {r['pipeline_over_classic']:.2f}x")
    for q in results.get("ratios", []):
        if q["a"] == "train_epoch" and q["b"] == r["id"]:
            notes.append(f"train() itself: {q['a_value']:.0f} img/s over a whole epoch ({q['value']:.2f}x)")
        if q["name"].endswith("/ 1 thread") and q["b"] == r["id"]:
            notes.append(f"{q['name']}: {q['value']:.2f}x")
    notes.append(f"repeats ±{50 * r['spread']:.0f}%")
    return "; ".join(notes)


def format_report(results: dict[str, Any]) -> str:
    m, d = results["machine"], results["data"]
    isa = " ".join(m["cpu_matrix_isa"]) or "no AVX"
    lines = [
        f"- Run: {results['started']}, `{results['command']}`.",
        f"- Machine: {m['cpu']} ({isa}), {m['cores_usable']} usable cores of {m['cores']}; torch {m['torch']}, "
        f"{_plural(m['torch_threads'], 'thread')}, CPU capability {m['cpu_capability']}, bf16 kernels {'yes' if m['cpu_bf16'] else 'no'}; "
        f"device {m['device']}" + (f" ({m['cuda_device']})" if m["cuda_device"] else "")
        + (f", TF32 matmul {m['cuda_tf32']['matmul']}, TF32 cuDNN {m['cuda_tf32']['cudnn']}" if m["cuda_tf32"] else "") + ".",
    ]
    if m["busy_elsewhere"] is not None:
        start, end = m["busy_elsewhere"], m["busy_elsewhere_end"]
        lines.append(f"- Other processes kept {100 * start:.0f}% of the CPUs busy at the start, {100 * end:.0f}% at the end"
                     + (" (load average " + ", ".join(f"{v:.2f}" for v in m["load_average"]) + ")" if m["load_average"] else "")
                     + (": **the machine was shared; the figures are low.**" if max(start, end) > 0.1 else "."))
    source = "a synthetic archive in a temporary folder" if d["synthetic"] else d["archive"]
    lines.append(f"- Data: {source}, {d['num_train']} train and {d['num_test']} test images." + (f" **{d['note']}**" if d["note"] else ""))
    if results["quick"]:
        lines.append("- **--quick: small batches, single-step repeats: the figures test the machinery, not the machine.**")
    peaks = ", ".join(f"{p['precision']} {p['flops_per_s'] / 1e9:.0f} GFLOP/s with {_plural(p['threads'] or m['torch_threads'], 'thread')}"
                      for p in results["peak"])
    lines += [f"- Peak ({results['peak'][0]['matmul']}² matmul, median of {results['settings']['repeats']}): {peaks}.", ""]
    for recipe in RECIPES:
        rows = [r for r in results["throughput"] if r["recipe"] == recipe.name]
        fpi = results["flops_per_image"][recipe.name]
        lines += [
            f"**{recipe.title}** ({'the fast recipe' if recipe.name == 'fast' else 'the tutorial network'}), "
            f"{fpi / 1e6:.0f} MFLOP per training image (forward + backward):",
            "",
            "| measurement | images/s | ratio | % of peak | notes |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            lines.append(f"| {_describe(r)} | {r['images_per_s']:.0f} | {r['ratio']:.2f} | "
                         f"{100 * r['peak_fraction']:.1f}% {r['precision']} | {_notes(r, results)} |")
        lines += ["", "ratio: images/s ÷ the first row's. % of peak: images/s × FLOPs per image ÷ the matmul peak "
                  "of that precision and thread count.", ""]
    p, ep, dn = results["preprocess"], results["train_epoch"], results["dvc_noop"]
    lines += ["**One-off costs:**", "", "| measurement | seconds | notes |", "| --- | ---: | --- |",
              f"| preprocess the whole archive | {p['seconds']:.2f} | cache {p['cache_bytes'] / 1e6:.1f} MB |",
              f"| load the cache (timed_load) | {p['load_seconds']:.3f} | {p['cache_bytes'] / 1e6 / p['load_seconds']:.0f} MB/s; "
              "the file was just written, so from the page cache |"]
    if "seconds" in dn:
        lines.append(f"| no-op `dvc repro` | {dn['seconds']:.2f} | median of 3 in {dn['project']} "
                     f"({', '.join(f'{t:.2f}' for t in dn['runs'])}) |")
    else:
        lines.append(f"| no-op `dvc repro` | – | skipped: {dn['skipped']} |")
    lines.append(f"| one epoch of train() | {ep['seconds']:.1f} | {ep['images_per_s']:.0f} img/s, {results['data']['num_train']} images, "
                 f"batch {ep['batch']}, {RECIPES[-1].title}, with its test pass; {ep['wall_seconds']:.1f} s with model build and export |")
    if results["denormal"]:
        dn = results["denormal"]
        lines.append(f"| {dn['matmul']}² matmul with denormal products, flush-to-zero off / on | "
                     f"{dn['flush_off']:.4f} / {dn['flush_on']:.4f} | {dn['slowdown']:.1f}x slower unflushed "
                     "(configure_threads turns flushing on) |")
    lines += ["", f"Bench wall time {results['total_seconds']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imgclf.bench", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    main()
