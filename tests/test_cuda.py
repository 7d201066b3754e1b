"""The CUDA path, on a real GPU: the training data resident on the device and augmented there,
bf16 autocast, channels_last, torch.compile, and a CUDA-trained model exported and used on
the CPU. Every test is marked ``cuda``; without a CUDA device conftest.py skips them (CI has
none). Run them with ``python -m pytest -m cuda tests`` (``tools/gpu_check.sh`` does).

The functions are called directly, as the CPU tests call them, so these tests need no ``dvc``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from imgclf.core.params import AugmentParams, EvaluateParams, ModelParams, TrainParams
from imgclf.models.bundle import load_state_dict_model
from imgclf.models.runtime import predict_logits
from imgclf.serve.evaluate import evaluate
from imgclf.serve.export import export
from imgclf.train.augment import Augmenter
import imgclf.train.loop as train_module
from imgclf.train.loop import TrainPaths, train
from imgclf.train.trainee import TrainStep

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
ROOT = Path(__file__).resolve().parents[1]


def run(cache_dir: Path, out: Path, model: ModelParams | None = None, **train_kw) -> dict:
    kw = {"epochs": 3, "batch_size": 25, "lr": 0.05, "device": DEVICE, "precision": "bf16"} | train_kw
    out.mkdir(parents=True, exist_ok=True)
    paths = TrainPaths(cache_dir, out / "trained.pt", out / "train.json", out / "curve.csv", out / "ckpt.pt", None, None)
    return train(model or ModelParams(), TrainParams(**kw), paths)


def curve(out: Path) -> list[dict[str, float]]:
    with open(out / "curve.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def assert_learned(metrics: dict, out: Path) -> None:
    rows = curve(out)
    losses = [r["train_loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert metrics["val_acc"] > 0.5  # chance is 0.1; the tiny classes differ by colour


@pytest.fixture
def spy(monkeypatch):
    """Records what every training step and every epoch's augmentation see."""
    seen: dict[str, list] = {"steps": [], "augment": [], "augmenters": [], "syncs": []}
    real_call = TrainStep.__call__

    def step(self, x, y):
        record = {"x": (x.device.type, x.dtype, x.is_contiguous(memory_format=torch.channels_last)),
                  "y": y.device.type}
        forward = self.forward

        def recording(inp):
            logits = forward(inp)
            record["autocast"] = torch.is_autocast_enabled(inp.device.type)
            record["logits"] = logits.dtype
            return logits

        self.forward = recording
        try:
            return real_call(self, x, y)
        finally:
            self.forward = forward
            seen["steps"].append(record)

    class SpyAugmenter(Augmenter):
        def __init__(self, images, **kw):
            super().__init__(images, **kw)
            seen["augmenters"].append((images.device.type, self.padded.device.type))

        def __call__(self, index, generator, epoch=0):
            out = super().__call__(index, generator, epoch)
            seen["augment"].append((index.device.type, generator.device.type, out.device.type))
            return out

    real_sync = torch.cuda.synchronize

    def sync(device=None):
        seen["syncs"].append(device)
        return real_sync(device)

    monkeypatch.setattr(TrainStep, "__call__", step)
    monkeypatch.setattr(train_module, "Augmenter", SpyAugmenter)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    return seen


def test_the_data_live_on_the_device_and_are_augmented_there(cache_dir, tmp_path, spy):
    metrics = run(cache_dir, tmp_path, precision="fp32")
    assert_learned(metrics, tmp_path)
    # The whole training split went to the GPU once; each epoch is permuted, cropped and
    # flipped there, and every batch is a slice of that device tensor.
    assert spy["augmenters"] == [("cuda", "cuda")]
    assert len(spy["augment"]) == 3 and set(spy["augment"]) == {("cuda", "cuda", "cuda")}
    assert len(spy["steps"]) == 3 * (180 // 25)
    assert {s["x"][0] for s in spy["steps"]} == {"cuda"} and {s["y"] for s in spy["steps"]} == {"cuda"}
    assert {s["x"][1] for s in spy["steps"]} == {torch.uint8}  # normalised inside the model, on the GPU
    # Each epoch's clock is read after a synchronize (train_seconds is the device's time).
    assert len(spy["syncs"]) >= 3 * 3 and metrics["train_seconds"] > 0


def test_the_augmenter_works_on_device_tensors():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g).to(DEVICE)
    index = torch.arange(64, device=DEVICE)
    plain = Augmenter(images, crop_padding=0, flip=False)(index, torch.Generator(DEVICE).manual_seed(0))
    assert plain.device.type == "cuda" and torch.equal(plain, images)
    for flip in (True, "alternate"):
        aug = Augmenter(images, crop_padding=2, flip=flip, seed=0)
        out = aug(index, torch.Generator(DEVICE).manual_seed(0), epoch=1)
        assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == images.shape
        # Each image is its own crop of the reflect-padded original, maybe mirrored.
        padded = torch.nn.functional.pad(images.cpu(), (2, 2, 2, 2), mode="reflect")
        for i in range(0, 64, 9):
            o = out[i].cpu()
            found = any(torch.equal(v, o) for dy in range(5) for dx in range(5)
                        for v in (padded[i, :, dy:dy + 32, dx:dx + 32], padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1)))
            assert found, f"image {i} ({flip=}) is not a shifted (and/or mirrored) crop of itself"
    # The same generator seed gives the same epoch: the GPU path is reproducible.
    a = Augmenter(images, crop_padding=2, flip=True)(index, torch.Generator(DEVICE).manual_seed(5))
    b = Augmenter(images, crop_padding=2, flip=True)(index, torch.Generator(DEVICE).manual_seed(5))
    assert torch.equal(a, b)


def test_bf16_autocast_and_channels_last(cache_dir, tmp_path, spy):
    metrics = run(cache_dir, tmp_path, precision="bf16", channels_last=True)
    assert_learned(metrics, tmp_path)
    steps = spy["steps"]
    assert all(s["autocast"] for s in steps)
    assert {s["logits"] for s in steps} == {torch.bfloat16}  # the network computed in bf16
    assert all(s["x"][2] for s in steps)  # each batch in channels_last
    bundle = torch.load(tmp_path / "trained.pt", weights_only=True)
    assert bundle["training"]["device"].startswith("cuda") and bundle["training"]["precision"] == "bfloat16"
    # The weights themselves stay fp32 (autocast casts per op) and come back to the CPU.
    assert all(v.dtype in (torch.float32, torch.int64) and v.device.type == "cpu" for v in bundle["state_dict"].values())


def test_channels_last_model_weights_on_the_device():
    from imgclf.train.trainee import build_trainee

    train_params = TrainParams(device=DEVICE, channels_last=True, epochs=1)
    tr = build_trainee(ModelParams(arch="whitened_net", width=8), train_params, num_classes=10, image_size=32,
                       mean=[0.5] * 3, std=[0.25] * 3, device=torch.device(DEVICE), amp=torch.bfloat16,
                       steps_per_epoch=1, init_images=torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8))
    convs = [m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.device.type == "cuda" for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert tr.memory_format == torch.channels_last


def test_torch_compile_trains_as_eager_does(cache_dir, tmp_path, monkeypatch):
    eager = run(cache_dir, tmp_path / "eager", epochs=1, precision="fp32")
    compiled_fns = []
    real_compile = torch.compile

    def recording_compile(fn, *args, **kwargs):
        compiled_fns.append(fn)
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    compiled = run(cache_dir, tmp_path / "compiled", epochs=1, precision="fp32", compile=True)
    assert len(compiled_fns) == 1  # the training forward, and only it
    # Same seed, same batches; fused kernels may round differently.
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-2)
    bf16 = run(cache_dir, tmp_path / "compiled-bf16", precision="bf16", compile=True)
    assert_learned(bf16, tmp_path / "compiled-bf16")


def test_a_cuda_trained_model_exports_and_predicts_on_the_cpu(cache_dir, tmp_path):
    """The speed recipe's network and its parts (whitening fitted on the GPU, lookahead,
    alternating flips) trained on the GPU; the exported files (ONNX and .pt2 included), with
    its test-time augmentation, agree; the state_dict bundle loads on a CPU-only process and classifies image files there; evaluate
    on the GPU agrees with the CPU."""
    recipe = dict(epochs=4, batch_size=50, lr=0.4, momentum=0.85, weight_decay=0.005, bias_lr_scale=64.0,
                  label_smoothing=0.2, lookahead=True, augment=AugmentParams(crop_padding=2, flip="alternate"))
    metrics = run(cache_dir, tmp_path, ModelParams(arch="whitened_net", width=8), **recipe)
    assert_learned(metrics, tmp_path)
    test = torch.load(cache_dir / "test.pt", weights_only=True)
    images, labels = test["images"], test["labels"]
    report = export(tmp_path / "trained.pt", tmp_path / "model.pt", tmp_path / "model_state.pt", tmp_path / "serving",
                    images[:8], formats=("onnx", "pt2"), tta_flip=True, tta_shift=1)
    assert report["max_abs_diff_state_dict"] == 0
    # The serving files too: torch 2.11's ONNX exporter could not translate the network's
    # global max pool while it was an AdaptiveMaxPool2d.
    assert report["max_abs_diff_onnx"] <= report["tolerance"] and report["max_abs_diff_pt2"] <= report["tolerance"]
    model, bundle = load_state_dict_model(tmp_path / "model_state.pt")
    assert bundle["training"]["device"].startswith("cuda") and bundle["tta"] == {"flip": True, "shift": 1}
    cpu_logits = predict_logits(model, images, batch_size=64, device=torch.device("cpu"))
    gpu_logits = predict_logits(model.to(DEVICE), images, batch_size=64, device=torch.device(DEVICE))
    assert torch.allclose(cpu_logits, gpu_logits, atol=5e-2, rtol=5e-2)  # cuDNN runs fp32 convolutions as TF32
    cpu_acc = (cpu_logits.argmax(1) == labels).float().mean().item()
    assert cpu_acc > 0.5
    got = evaluate(tmp_path / "model_state.pt", cache_dir, EvaluateParams(), tmp_path / "eval.json",
                   tmp_path / "predictions.csv")
    assert abs(got["test_acc"] - cpu_acc) <= 1 / len(labels) + 1e-9

    # imgclf-predict (as `python -m imgclf.serve.predict`) in a process that sees no GPU.
    files = []
    for i in range(6):
        path = tmp_path / "photos" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), images[i].permute(1, 2, 0).numpy()[:, :, ::-1])  # RGB -> BGR, lossless
        files.append(str(path))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "imgclf.serve.predict", "--model", str(tmp_path / "model_state.pt"),
                           "--json", "--top-k", "1", *files], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    classes = bundle["classes"]
    assert [r["top"][0]["class"] for r in results] == [classes[int(k)] for k in cpu_logits[:6].argmax(1)]
