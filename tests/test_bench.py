"""The benchmark: `python -m imgclf.bench --quick`, run as `make bench` runs it, and the parts
whose results can be known without trusting the bench's own numbers: the three feeders give
the training step different batches, the epoch row is train() itself (checked against
train()'s own log), and the report prints exactly the rows of a hand-made result."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgclf.bench.feeders import RECIPES, Config, build, classic_feeder, compute_feeder, extract_batches, pipeline_feeder
from imgclf.bench.report import format_report
from imgclf.bench.rows import ratio, recipe_ratios
from imgclf.cache.dataset import load_cache
from imgclf.core.params import PreprocessParams
from imgclf.data.preprocess import preprocess

from helpers import ROOT, run_env

DVC_YAML = """\
stages:
  touch:
    cmd: python -c "open('out.txt', 'w').write('x')"
    outs:
      - out.txt
"""


@pytest.fixture(scope="module")
def up_to_date_project(tmp_path_factory) -> Path:
    """The smallest DVC project, reproduced once: a `dvc repro` there has nothing to do."""
    proj = tmp_path_factory.mktemp("dvcproj")
    (proj / "dvc.yaml").write_text(DVC_YAML)
    for args in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, env=run_env(), check=True, capture_output=True, timeout=120)
    return proj


@pytest.fixture(scope="module")
def bench(tmp_path_factory, up_to_date_project) -> tuple[dict, str, str]:
    """The results JSON, stdout (the report) and stderr (the log) of one --quick run."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "imgclf.bench", "--quick", "--device", "cpu", "--json", str(out), "--project", str(up_to_date_project)],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, proc.stderr


def test_every_measurement_is_there_and_positive(bench):
    results, _, _ = bench
    rows = results["throughput"]
    for recipe in ("seed_cnn", "fast"):
        mine = [r for r in rows if r["recipe"] == recipe]
        kinds = {(r["kind"], r["workers"]) for r in mine}
        assert kinds == {("pipeline", None), ("compute", None), ("classic", 0), ("classic", 2)}
        assert {r["precision"] for r in mine} >= {"fp32"}
        assert {r["channels_last"] for r in mine} == {True, False}
        assert len({r["batch"] for r in mine}) == 2  # the batch-size comparison
        if results["machine"]["cores_usable"] > 1:
            assert {r["threads"] for r in mine} == {1, results["machine"]["torch_threads"]}
    for r in rows:
        assert len(r["repeats"]) >= 5 and all(v > 0 for v in r["repeats"])
        assert min(r["repeats"]) <= r["images_per_s"] <= max(r["repeats"])  # the median
        # --quick times a 512² matmul for the peak: on a shared machine it can read several
        # times low, so only an absurd fraction (a step that did no work) is an error here.
        assert 0 < r["peak_fraction"] < 50
    assert all(v > 0 for v in results["flops_per_image"].values())
    assert all(p["flops_per_s"] > 0 for p in results["peak"])
    assert {p["precision"] for p in results["peak"]} >= {"fp32"}
    pre = results["preprocess"]
    assert pre["seconds"] > 0 and pre["cache_bytes"] > 0 and pre["load_seconds"] > 0
    dvc = results["dvc_noop"]
    assert "skipped" not in dvc, dvc
    assert len(dvc["runs"]) == 3 and dvc["seconds"] > 0
    assert results["denormal"]["flush_off"] > 0 and results["denormal"]["flush_on"] > 0
    assert results["data"]["synthetic"] and results["machine"]["cpu"]


def test_ratios_compare_the_rows_they_name(bench):
    """Each overhead pairs a pipeline row with the compute row of the same configuration, whose
    timings are its own; each classic ratio is against the recipe's first row."""
    results, _, _ = bench
    rows = {r["id"]: r for r in results["throughput"]}
    names = [q["name"] for q in results["ratios"]]
    assert names.count("data-path overhead") >= 4
    assert sum(n.startswith("pipeline / classic") for n in names) == 4
    for q in results["ratios"]:
        assert q["a"] in rows or q["a"] == "train_epoch"
        assert q["b"] in rows
    for q in (q for q in results["ratios"] if q["name"] == "data-path overhead"):
        a, b = rows[q["a"]], rows[q["b"]]
        assert (a["kind"], b["kind"]) == ("pipeline", "compute")
        assert {k: v for k, v in a.items() if k in ("recipe", "precision", "channels_last", "batch", "threads")} == \
               {k: v for k, v in b.items() if k in ("recipe", "precision", "channels_last", "batch", "threads")}
        assert a["repeats"] != b["repeats"]  # two measurements, not one row read twice
    for q in (q for q in results["ratios"] if q["name"].startswith("pipeline / classic")):
        assert rows[q["a"]]["id"] == rows[q["a"]]["reference"] and rows[q["b"]]["kind"] == "classic"
    epoch = next(q for q in results["ratios"] if q["a"] == "train_epoch")
    assert rows[epoch["b"]]["recipe"] == "fast" and rows[epoch["b"]]["id"] == rows[epoch["b"]]["reference"]


def test_the_epoch_row_is_train_itself(bench):
    """The epoch's figures are the ones train() logged while it trained and tested."""
    results, _, log = bench
    epoch = results["train_epoch"]
    assert 0 <= epoch["val_acc"] <= 1
    assert 0 < epoch["seconds"] <= epoch["wall_seconds"]
    batch = RECIPES[-1].batch // 8  # --quick divides batches by 8
    assert epoch["batch"] == batch
    # train()'s plan and epoch lines (imgclf.train.loop logs them).
    kept = epoch["train_images"]  # train.val_fraction (0.1) of each class held out
    assert kept + epoch["val_images"] == results["data"]["num_train"] and 0.85 < kept / results["data"]["num_train"] < 0.95
    steps = kept // batch
    assert "training resnet_fast" in log and f"{kept} images, batch {batch}, {steps} steps/epoch" in log
    # The compute: FLOPs per image (counted once) x the images the epoch trained on.
    assert epoch["pflop"] == pytest.approx(results["flops_per_image"]["fast"] * steps * batch / 1e15, rel=1e-5)
    # Sustained share of the peak: the epoch's FLOPs / its seconds / the all-threads peak of its
    # precision (--quick's small matmul peak is no ceiling, so only the arithmetic is checked).
    peak = next(p["flops_per_s"] for p in results["peak"] if (p["precision"], p["threads"]) == (epoch["peak_precision"], 0))
    # (train_seconds is rounded to 0.01 s)
    assert epoch["tflop_per_s"] == pytest.approx(epoch["pflop"] * 1e3 / epoch["seconds"], rel=0.006 / epoch["seconds"] + 1e-5)
    assert epoch["peak_fraction"] == pytest.approx(epoch["tflop_per_s"] * 1e12 / peak, rel=1e-9) and epoch["peak_fraction"] > 0
    line = re.search(r"epoch 1/1 .* acc ([\d.]+)  lr \S+  (\d+) img/s  ([\d.]+) s", log)
    assert line is not None, log[-2000:]
    val_acc, images_per_s, seconds = float(line[1]), float(line[2]), float(line[3])
    assert epoch["val_acc"] == pytest.approx(val_acc, abs=6e-5)  # logged with 4 decimals
    assert epoch["images_per_s"] == pytest.approx(images_per_s, abs=0.55)  # logged as a whole number
    assert epoch["seconds"] == pytest.approx(seconds, abs=0.06)  # logged with 1 decimal


def test_the_printed_table_shows_the_json_numbers(bench):
    results, stdout, _ = bench
    assert results["report"] in stdout
    assert "| measurement | images/s | ratio | % of peak | notes |" in stdout
    for r in results["throughput"]:
        assert f"| {r['images_per_s']:.0f} | {r['ratio']:.2f} |" in stdout
    assert "SYNTHETIC" in stdout and "no-op `dvc repro`" in stdout


# --- In process, on a tiny archive ------------------------------------------------------------


def test_the_three_feeders_give_the_step_different_batches(cifar_archive, tmp_path):
    """compute repeats one fixed batch; pipeline augments a new one each step; classic reads
    them from torchvision's CIFAR10 through a DataLoader. All reach the network as the same
    normalised floats of uint8 pixels, batch by batch."""
    preprocess(cifar_archive, tmp_path / "processed", PreprocessParams())
    cache = load_cache(tmp_path / "processed")
    device = torch.device("cpu")
    cfg = Config(RECIPES[0], batch=20, precision="fp32", channels_last=False, threads=1)
    x, y = cache.train.images, cache.train.labels
    root = extract_batches(cifar_archive, tmp_path / "torchvision")
    seen: dict[str, list[torch.Tensor]] = {}
    for kind in ("compute", "pipeline", "classic"):
        tr, train_params = build(cfg, device, cache)
        inputs = seen[kind] = []
        tr.model.net.register_forward_pre_hook(lambda _, args, inputs=inputs: inputs.append(args[0].detach().clone()))
        close = None
        if kind == "compute":
            feeder = compute_feeder(tr, train_params, x, y)
        elif kind == "pipeline":
            feeder = pipeline_feeder(tr, train_params, x, y, torch.Generator().manual_seed(0))
        else:
            feeder, close = classic_feeder(tr, train_params, root, cache.mean, cache.std, 0, cache.image_size)
        assert feeder(3) == 3 * 20
        if close is not None:
            close()
        # The schedule of a 10-epoch run over 50,000 images: 3 steps into onecycle's warm-up.
        warmup = int(0.25 * 10 * (50_000 // 20))
        assert tr.step.optimizer.param_groups[0]["lr"] == pytest.approx(RECIPES[0].lr * 3 / warmup)
        assert len(inputs) == 3 and all(b.shape == (20, 3, 32, 32) for b in inputs)
        for b in inputs:  # back to pixels: whole numbers in 0..255
            mean, std = torch.tensor(cache.mean).view(3, 1, 1), torch.tensor(cache.std).view(3, 1, 1)
            pixels = (b * std + mean) * 255
            assert torch.allclose(pixels, pixels.round(), atol=2e-3) and pixels.min() > -0.01 and pixels.max() < 255.01
    first_batch = seen["compute"][0]
    assert torch.allclose(first_batch, tr.model.normalize(x[:20]))
    assert all(torch.equal(b, first_batch) for b in seen["compute"])
    for kind in ("pipeline", "classic"):
        b0, b1, b2 = seen[kind]
        assert not torch.equal(b0, b1) and not torch.equal(b1, b2)
        assert not torch.allclose(b0, first_batch)
    assert not torch.allclose(seen["pipeline"][0], seen["classic"][0])


def _row(rid: str, images_per_s: float, spread: float, *, reference: dict | None = None, threads: int = 2) -> dict:
    """A throughput row as Bench.row and run_bench make it, for a peak of 100 GFLOP/s (60 with
    one thread) and 1.3 / 25 MFLOP per image."""
    recipe, kind, precision, layout, batch, _, *workers = rid.split("/")
    peak = 60e9 if threads == 1 else 100e9
    ref = reference or {"id": rid, "images_per_s": images_per_s}
    return {
        "id": rid, "recipe": recipe, "kind": kind, "precision": precision, "channels_last": layout == "cl",
        "batch": int(batch[1:]), "threads": threads, "workers": int(workers[0][1:]) if workers else None,
        "images_per_s": images_per_s, "spread": spread, "reference": ref["id"],
        "ratio": images_per_s / ref["images_per_s"],
        "peak_fraction": images_per_s * {"seed_cnn": 1.3e6, "fast": 25e6}[recipe] / peak,
    }


def test_the_report_prints_exactly_these_rows():
    seed = _row("seed_cnn/pipeline/fp32/nchw/b16/t0", 3000, 0.5)
    seed_rows = [seed, _row("seed_cnn/compute/fp32/nchw/b16/t0", 3100, 0.2, reference=seed)]
    fast = _row("fast/pipeline/fp32/cl/b64/t0", 800, 0.1)
    fast_rows = [fast, _row("fast/compute/fp32/cl/b64/t0", 1000, 0.02, reference=fast),
                 _row("fast/classic/fp32/cl/b64/t0/w0", 200, 0.04, reference=fast),
                 _row("fast/pipeline/fp32/cl/b64/t1", 500, 0.06, reference=fast, threads=1)]
    ratios = recipe_ratios(seed_rows) + recipe_ratios(fast_rows)
    ratios.append(ratio("train() epoch / bench pipeline", "train_epoch", 760, fast["id"], 800, "a/b", "fast"))
    results = {
        "command": "python -m imgclf.bench --quick", "started": "2026-01-01 00:00 UTC", "quick": True,
        "settings": {"repeats": 5},
        "machine": {"cpu": "Test CPU", "cpu_matrix_isa": ["avx2"], "cores": 4, "cores_usable": 2, "torch": "2.0",
                    "torch_threads": 2, "cpu_capability": "AVX2", "cpu_bf16": False, "device": "cpu",
                    "cuda_device": None, "cuda_tf32": None, "busy_elsewhere": 0.05, "busy_elsewhere_end": 0.2,
                    "load_average": [1.0, 0.5, 0.25]},
        "data": {"archive": "/tmp/x.tar.gz", "synthetic": True, "note": "SYNTHETIC random data: --quick",
                 "num_train": 512, "num_test": 128},
        "peak": [{"precision": "fp32", "threads": 0, "flops_per_s": 100e9, "matmul": 512},
                 {"precision": "fp32", "threads": 1, "flops_per_s": 60e9, "matmul": 512}],
        "flops_per_image": {"seed_cnn": 1.3e6, "fast": 25e6},
        "throughput": seed_rows + fast_rows, "ratios": ratios,
        "preprocess": {"seconds": 1.5, "cache_bytes": 2_000_000, "load_seconds": 0.01},
        "dvc_noop": {"seconds": 0.6, "runs": [0.7, 0.6, 0.5], "project": "/p"},
        "train_epoch": {"seconds": 2.34, "images_per_s": 760, "batch": 64, "wall_seconds": 3.0, "train_images": 460,
                        "val_images": 52, "pflop": 1.15e-5, "tflop_per_s": 0.0049, "peak_fraction": 0.049,
                        "peak_precision": "fp32"},
        "denormal": {"matmul": 256, "flush_off": 0.01, "flush_on": 0.001, "slowdown": 10.0},
        "total_seconds": 61.2,
    }
    legend = ("ratio: images/s ÷ the first row's. % of peak: images/s × FLOPs per image ÷ the matmul peak "
              "of that precision and thread count.")
    expected = f"""\
- Run: 2026-01-01 00:00 UTC, `python -m imgclf.bench --quick`.
- Machine: Test CPU (avx2), 2 usable cores of 4; torch 2.0, 2 threads, CPU capability AVX2, bf16 kernels no; device cpu.
- Other processes kept 5% of the CPUs busy at the start, 20% at the end (load average 1.00, 0.50, 0.25): **the machine was shared; the figures are low.**
- Data: a synthetic archive in a temporary folder, 512 train and 128 test images. **SYNTHETIC random data: --quick**
- **--quick: small batches, single-step repeats: the figures test the machinery, not the machine.**
- Peak (512² matmul, median of 5): fp32 100 GFLOP/s with 2 threads, fp32 60 GFLOP/s with 1 thread.

**seed_cnn** (the tutorial network), 1 MFLOP per training image (forward + backward):

| measurement | images/s | ratio | % of peak | notes |
| --- | ---: | ---: | ---: | --- |
| pipeline: fp32, NCHW, batch 16, 2 threads | 3000 | 1.00 | 3.9% fp32 | the recipe as `dvc repro` trains it; data-path overhead 3.2% (1 - pipeline/compute only, within the repeats' spread); repeats ±25% |
| compute only: fp32, NCHW, batch 16 | 3100 | 1.03 | 4.0% fp32 | ceiling: one fixed batch on the device; repeats ±10% |

{legend}

**resnet_fast w32** (the fast recipe), 25 MFLOP per training image (forward + backward):

| measurement | images/s | ratio | % of peak | notes |
| --- | ---: | ---: | ---: | --- |
| pipeline: fp32, channels_last, batch 64, 2 threads | 800 | 1.00 | 20.0% fp32 | the recipe as `dvc repro` trains it; data-path overhead 20.0% (1 - pipeline/compute only); train() itself: 760 img/s over a whole epoch (0.95x); repeats ±5% |
| compute only: fp32, channels_last, batch 64 | 1000 | 1.25 | 25.0% fp32 | ceiling: one fixed batch on the device; repeats ±1% |
| classic DataLoader, 0 workers: fp32, channels_last, batch 64 | 200 | 0.25 | 5.0% fp32 | pipeline/classic = 4.00x; repeats ±2% |
| pipeline: fp32, channels_last, batch 64, 1 thread | 500 | 0.62 | 20.8% fp32 | 2 threads / 1 thread: 1.60x; repeats ±3% |

{legend}

**One-off costs:**

| measurement | seconds | notes |
| --- | ---: | --- |
| preprocess the whole archive | 1.50 | cache 2.0 MB |
| load the cache (timed_load) | 0.010 | 200 MB/s; the file was just written, so from the page cache |
| no-op `dvc repro` | 0.60 | median of 3 in /p (0.70, 0.60, 0.50) |
| one epoch of train() | 2.3 | 760 img/s, 460 images (52 held out), batch 64, resnet_fast w32, with its validation pass; 3.0 s with model build and export; 1.15e-05 PFLOP, 5 GFLOP/s sustained = 4.9% of the fp32 peak |
| 256² matmul with denormal products, flush-to-zero off / on | 0.0100 / 0.0010 | 10.0x slower unflushed (configure_threads turns flushing on) |

Bench wall time 61 s."""
    assert format_report(results) == expected


def test_the_bench_takes_the_workspace_data_whatever_its_source(tmp_path, monkeypatch):
    """After the demo (image folders in data/raw) the bench decodes them into an official-format
    archive; with data it cannot use, synthetic data stands in and says why: the workspace
    never makes the bench fail."""
    import cv2

    from imgclf.bench.run import choose_archive
    from imgclf.bench.timing import QUICK

    from helpers import CLASSES, make_split, make_tar

    split = make_split(20, 0)
    members = {}
    for part in ("train", "test"):
        for i, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
            ok, png = cv2.imencode(".png", image.permute(1, 2, 0).numpy()[:, :, ::-1].copy())
            members[f"photos/{part}/{CLASSES[label]}/{i}.png"] = png.tobytes()
    work = tmp_path / "work"
    (work / "data/raw").mkdir(parents=True)
    make_tar(work / "data/raw/photos.tar", members, mode="w")
    (work / "params.yaml").write_text("preprocess:\n  dataset: imagefolder\n")
    monkeypatch.chdir(work)
    archive, synthetic = choose_archive(None, False, tmp_path / "tmp1", QUICK)
    assert synthetic is None
    out = tmp_path / "processed"
    preprocess(archive, out, PreprocessParams())  # the official format, which the classic row reads
    cache = load_cache(out)
    assert len(cache.train) == len(cache.test) == 20 and cache.classes == sorted(CLASSES)

    # A file the params' format cannot read: synthetic data, and the reason.
    (work / "data/raw/photos.tar").unlink()
    (work / "data/raw/junk.tar").write_bytes(b"not an archive")
    (tmp_path / "tmp2").mkdir()
    archive, synthetic = choose_archive(None, False, tmp_path / "tmp2", QUICK)
    assert synthetic.startswith("SYNTHETIC") and "junk.tar" in synthetic
