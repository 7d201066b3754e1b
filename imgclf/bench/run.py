"""The whole benchmark, in the order it runs: the data, preprocessing and loading it, a no-op
``dvc repro``, the FLOP ceilings, every throughput row, and one real epoch of train()."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..cache.dataset import Split, load_cache
from ..core import paths
from ..core.errors import PipelineError
from ..core.params import PreprocessParams, TrainParams, load_params
from ..data.preprocess import preprocess
from ..models.runtime import configure_threads, resolve_device, resolve_precision
from ..models.shapes import train_flops_per_image
from ..train.loop import TrainPaths, train
from .cifar_writer import write_archive
from .feeders import RECIPES, Recipe, extract_batches
from .machine import bf16_available, busy_elsewhere, machine_info
from .rows import Bench, plan, ratio, recipe_ratios
from .timing import FULL, QUICK, Settings, denormal_cost, peak_flops, synchronizer, timed_load

log = logging.getLogger(__name__)


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
        given = archive is not None
        archive, synthetic = choose_archive(archive, quick, tmp, s)
        results["data"] = {"archive": str(archive), "synthetic": synthetic is not None, "note": synthetic}
        if synthetic:
            log.warning("%s", synthetic)

        # Preprocess the whole archive, then load the cache as training does.
        cache_dir = tmp / "processed"
        try:
            stats = preprocess(archive, cache_dir, PreprocessParams())
        except PipelineError as e:
            if given or results["data"]["synthetic"]:  # --archive's, or ours: a real error
                raise
            archive, synthetic = choose_archive(None, True, tmp, s)  # the workspace's archive is not usable
            synthetic = synthetic.replace("--quick", f"the workspace's data cannot be benchmarked ({e})")
            results["data"] = {"archive": str(archive), "synthetic": True, "note": synthetic}
            log.warning("%s", synthetic)
            stats = preprocess(archive, cache_dir, PreprocessParams())
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
            r.name: train_flops_per_image(r.model_params, num_classes=len(cache.classes), image_size=cache.image_size)
            for r in RECIPES
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
            ratios += recipe_ratios(mine)
        results["throughput"] = rows
        del bench  # on a GPU, frees its copy of the data before train() makes its own

        # One real epoch of train() itself on the whole cache: the fast recipe.
        fast = RECIPES[-1]
        batch = fast.batch // s.batch_divisor
        log.info("one epoch of imgclf.train.loop.train (%s, batch %d) on %d images", fast.title, batch, len(cache.train))
        epoch = results["train_epoch"] = train_epoch(fast, batch, cache_dir, tmp / "train", device)
        # Sustained over the whole epoch, its validation pass and the logging included: the
        # share of the matmul peak (all threads) at the precision train() chose.
        precision = {None: "fp32", torch.bfloat16: "bf16"}.get(resolve_precision("auto", device))
        peak = next((p["flops_per_s"] for p in results["peak"] if (p["precision"], p["threads"]) == (precision, 0)), None)
        epoch["peak_fraction"] = epoch["tflop_per_s"] * 1e12 / peak if peak else None  # None: fp16, unmeasured
        epoch["peak_precision"] = precision
        twin = next(r for r in rows if r["recipe"] == fast.name)  # the recipe's pipeline row
        ratios.append(ratio("train() epoch / bench pipeline", "train_epoch", epoch["images_per_s"], twin["id"], twin["images_per_s"], "a/b", fast.name))
        results["ratios"] = ratios

    if results["machine"]["load_average"] is not None:
        results["machine"]["load_average_end"] = list(os.getloadavg())
    results["machine"]["busy_elsewhere_end"] = busy_elsewhere()
    results["total_seconds"] = time.perf_counter() - started
    return results


# --- The data ------------------------------------------------------------------------------


def synthesize_archive(path: Path, num_train: int, num_test: int) -> None:
    """Random uint8 CIFAR-shaped images written as an official-format archive."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_archive(path, split(num_train), split(num_test), classes)


def choose_archive(archive: Path | None, quick: bool, tmp: Path, s: Settings) -> tuple[Path, str | None]:
    """The archive to benchmark and, when synthetic data stands in, why. Without --archive:
    the download stage's, in the format params.yaml names; image folders (the demo, your own
    data) are decoded at 32 pixels and written as an official-format archive, which the
    classic torchvision row reads. Nothing in the workspace makes the bench fail: where its
    data cannot be used, synthetic data stands in and the report says why."""
    if archive is not None:
        if not archive.is_file():
            raise PipelineError(f"--archive {archive}: no such file")
        return archive, None
    why = None
    if quick:
        why = "--quick"
    else:
        try:
            return _workspace_archive(tmp), None
        except PipelineError as e:
            why = f"the workspace's data cannot be benchmarked ({e})"
    path = tmp / "synthetic" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    synthesize_archive(path, s.num_train, s.num_test)
    return path, f"SYNTHETIC random data ({s.num_train} train + {s.num_test} test images): {why}"


def _workspace_archive(tmp: Path) -> Path:
    found = paths.find_archive()
    dataset = load_params(paths.PARAMS).preprocess.dataset if paths.PARAMS.is_file() else "cifar10"
    if dataset == "cifar10":
        return found
    log.info("%s holds image folders: decoding them at 32 pixels into an official-format archive", found)
    cache_dir = tmp / "from-folders"
    preprocess(found, cache_dir, PreprocessParams(dataset="imagefolder", image_size=32))
    cache = load_cache(cache_dir)
    out = tmp / "from-folders.tar.gz"
    write_archive(out, cache.train, cache.test, cache.classes)
    return out


# --- Ceilings and one-off costs --------------------------------------------------------------


def measure_peaks(device: torch.device, s: Settings, all_threads: int) -> list[dict[str, Any]]:
    """The matmul peak per precision, with all threads and (on a multi-core CPU) one."""
    sync = synchronizer(device)
    precisions = ["fp32"] + (["bf16"] if bf16_available(device) else [])
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
    """One epoch of :func:`imgclf.train.loop.train` itself, on the whole preprocessed cache."""
    train_params = TrainParams(
        epochs=1, batch_size=batch, lr=recipe.lr, label_smoothing=recipe.label_smoothing,
        device=str(device), precision="auto", channels_last=True, threads=0,
    )
    tp = TrainPaths(cache_dir, out / "trained.pt", out / "train.json", out / "train_curve.csv", out / "train_ckpt.pt", None, None)
    t0 = time.perf_counter()
    metrics = train(recipe.model_params, train_params, tp)
    return {
        "recipe": recipe.name, "batch": batch, "precision": "auto", "channels_last": True,
        "wall_seconds": time.perf_counter() - t0,  # model build, epoch, test pass, export
        "seconds": metrics["train_seconds"],  # the epoch and its test pass, as train.py logs it
        "images_per_s": metrics["images_per_s"],  # the epoch's training steps alone
        "val_acc": metrics["val_acc"],  # on the held-out tenth (train.val_fraction)
        "train_images": metrics["train_images"], "val_images": metrics["val_images"],
        "pflop": metrics["train_pflop"],  # the epoch's training compute
        "tflop_per_s": metrics["tflop_per_s"],  # over the epoch and its validation pass
    }
