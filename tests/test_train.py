"""The training function itself, called directly on a tiny cached dataset (the recipe the
stage script wraps): determinism, precision and memory-format modes, compile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from imgclf.core.params import ModelParams, PreprocessParams, TrainParams
from imgclf.data.preprocess import preprocess
from imgclf.models.runtime import cpu_supports_bf16
from imgclf.train.loop import TrainPaths, train

from helpers import preprocessed_cache


def run(cache_dir: Path, out: Path, model: ModelParams | None = None, **train_kw) -> tuple[dict, dict]:
    kw = {"epochs": 3, "batch_size": 25, "lr": 0.05, "threads": 1, "device": "cpu", "precision": "fp32"} | train_kw
    out.mkdir(parents=True, exist_ok=True)
    paths = TrainPaths(cache_dir, out / "model.pt", out / "train.json", out / "curve.csv", out / "ckpt.pt", None, None)
    metrics = train(model or ModelParams(), TrainParams(**kw), paths)
    return metrics, torch.load(out / "model.pt", weights_only=True)["state_dict"]


def test_same_params_and_seed_give_identical_results(cache_dir, tmp_path):
    m1, s1 = run(cache_dir, tmp_path / "a")
    m2, s2 = run(cache_dir, tmp_path / "b")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "train_pflop"):
        assert m1[key] == m2[key], key
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3, _ = run(cache_dir, tmp_path / "c", seed=1)
    assert m3["train_loss"] != m1["train_loss"]  # the seed matters


@pytest.fixture(scope="module")
def noisy_cache_dir(tmp_path_factory) -> Path:
    """2,000 training images whose class colours are buried in heavy noise, so that a 3-epoch
    run lands well below 100% and a difference in learning shows; half of them are held out."""
    return preprocessed_cache(tmp_path_factory.mktemp("noisy"), 2000, noise=400)


# bf16 vs fp32, each seed 0-4, 3 epochs, measured on a CPU with AMX (2-core Xeon): fp32 val_acc
# 0.853-0.892 over the seeds, bf16 minus fp32 from -0.011 to +0.007 (1,000 held-out images, so one
# image is 0.001), val_loss from -0.015 to +0.002. The margins sit about 3x beyond the widest.
BF16_ACC_MARGIN = 0.03
BF16_LOSS_MARGIN = 0.05


@pytest.mark.skipif(not cpu_supports_bf16(), reason="needs a CPU with bf16 kernels (AVX512-BF16 or AMX); this one has neither")
def test_bf16_channels_last_learns_as_well_as_fp32(noisy_cache_dir, tmp_path):
    kw = {"val_fraction": 0.5}
    fp32, _ = run(noisy_cache_dir, tmp_path / "fp32", channels_last=False, **kw)
    bf16, state = run(noisy_cache_dir, tmp_path / "bf16", precision="bf16", channels_last=True, **kw)
    assert fp32["val_images"] == bf16["val_images"] == 1000
    assert 0.6 < fp32["val_acc"] < 0.98  # the task discriminates: neither at chance nor saturated
    assert bf16["val_acc"] >= fp32["val_acc"] - BF16_ACC_MARGIN
    assert bf16["val_loss"] <= fp32["val_loss"] + BF16_LOSS_MARGIN
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # weights stay fp32


# Learning, judged on 100 held-out images (chance 0.1). Seeds 0-5 of each case below, on a
# 2-core Xeon: 0.70 to 1.00, the lowest of each case 0.70 (resnet_fast), 0.72 (sgd, constant),
# 0.80 (adam, adamw), 1.00 (seed_cnn). The bar sits 20 images below the lowest.
LEARNS = 0.5


@pytest.mark.parametrize("arch,epochs,lr", [("seed_cnn", 2, 0.01), ("resnet_fast", 3, 0.05)])
def test_other_architectures_train(learn_cache_dir, tmp_path, arch, epochs, lr):
    metrics, _ = run(learn_cache_dir, tmp_path, ModelParams(arch=arch, width=8), epochs=epochs, lr=lr, val_fraction=0.2)
    assert metrics["val_images"] == 100
    assert metrics["val_acc"] > LEARNS and metrics["epochs"] == epochs


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("adamw", "linear"), ("sgd", "constant")])
def test_optimizers_and_schedules_learn(learn_cache_dir, tmp_path, optimizer, schedule):
    lr = 0.05 if optimizer == "sgd" else 0.003
    metrics, _ = run(learn_cache_dir, tmp_path, optimizer=optimizer, schedule=schedule, lr=lr, label_smoothing=0.1,
                     val_fraction=0.2)
    assert metrics["val_acc"] > LEARNS


def test_torch_compile_path_runs_on_cpu(cache_dir, tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    eager, _ = run(cache_dir, tmp_path / "eager", epochs=1)
    compiled, _ = run(cache_dir, tmp_path / "compiled", epochs=1, compile=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)


def test_checkpoint_of_other_params_is_ignored(cache_dir, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "other", "epoch": 5}, ckpt)
    metrics, _ = run(cache_dir, tmp_path, epochs=1)
    assert metrics["epochs"] == 1 and not ckpt.exists()
    assert json.loads((tmp_path / "train.json").read_text())["epochs"] == 1


def test_run_steps_leaves_the_batch_source_open(cache_dir):
    """Several calls can draw from one endless source of batches (as the benchmark does)."""
    from imgclf.models import registry as models
    from imgclf.train.trainee import make_step, run_steps

    model = models.build("seed_cnn", models.arch_args(ModelParams(arch="seed_cnn"), num_classes=10, image_size=32), [0.5] * 3, [0.2] * 3)
    train_params = TrainParams(device="cpu", precision="fp32")
    step = make_step(model, train_params, torch.device("cpu"), None, total_steps=100, steps_per_epoch=10)
    drawn = []

    def endless():
        while True:
            drawn.append(1)
            yield torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)

    source = endless()
    for _ in range(3):
        losses, _ = run_steps(step, source, 2, epoch=0)
        assert len(losses) == 2
    assert len(drawn) == 6


def test_divergence_names_the_step_within_the_epoch():
    from imgclf.core.errors import PipelineError
    from imgclf.train.trainee import check_finite

    check_finite(torch.tensor([1.0, 2.0]), epoch=0, first_step=5)
    with pytest.raises(PipelineError, match=r"at epoch 3, step 13;"):
        check_finite(torch.tensor([1.0, 1.0, float("nan"), float("inf")]), epoch=2, first_step=10)


def test_a_damaged_checkpoint_is_set_aside_and_training_starts_fresh(cache_dir, tmp_path, caplog):
    """A checkpoint cut short (a power loss after the rename) must not block training."""
    fresh, fresh_state = run(cache_dir, tmp_path / "fresh", epochs=2)
    out = tmp_path / "damaged"
    out.mkdir()
    from imgclf.train import checkpoint
    from imgclf.core.params import ModelParams as MP

    whole = tmp_path / "whole.pt"
    checkpoint.save(whole, fingerprint="x", epoch=0, history=[], model=torch.nn.Linear(2, 2), step_state={},
                    model_params=MP(), train_params=TrainParams())
    (out / "ckpt.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        metrics, state = run(cache_dir, out, epochs=2)
    assert "does not load" in caplog.text and "training starts fresh" in caplog.text
    assert [p.name.startswith("ckpt.pt.damaged-") for p in out.iterdir() if p.name.startswith("ckpt")] == [True]
    assert metrics["train_loss"] == fresh["train_loss"]
    assert all(torch.equal(state[k], fresh_state[k]) for k in state)


def test_checkpoint_loads_without_unpickling_code_and_carries_its_params(cache_dir, tmp_path):
    """weights_only=True loads it; the params it was made with are inside, readable alone."""
    from imgclf.train import checkpoint

    model = torch.nn.Linear(2, 2)
    path = tmp_path / "c.pt"
    checkpoint.save(path, fingerprint="f", epoch=3, history=[{"epoch": 4.0}], model=model, step_state={},
                    model_params=ModelParams(arch="resnet_fast", width=16), train_params=TrainParams(lr=0.2))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["params"]["model"]["arch"] == "resnet_fast" and ckpt["params"]["train"]["lr"] == 0.2
    assert checkpoint.load(path, "f", torch.device("cpu"))["epoch"] == 3
    assert checkpoint.load(path, "other", torch.device("cpu")) is None and path.exists()


@pytest.fixture(scope="module")
def cache_dir_8px(tmp_path_factory, cifar_archive) -> Path:
    out = tmp_path_factory.mktemp("cache8") / "processed"
    preprocess(cifar_archive, out, PreprocessParams(image_size=8))
    return out


@pytest.mark.parametrize("model,train_kw,message", [
    (ModelParams(arch="vgg16"), {},
     r"^model.arch = 'vgg16' cannot classify 8-pixel images \(preprocess.image_size = 8, in .*meta.json\): "
     r"the smallest size it takes is 32 pixels$"),
    (ModelParams(), {"augment": {"crop_padding": 8}},
     r"^train.augment.crop_padding = 8 must be smaller than the images \(preprocess.image_size = 8, in .*meta.json\)"),
])
def test_params_that_do_not_fit_the_image_size_fail_before_training(cache_dir_8px, tmp_path, model, train_kw, message):
    """Params the schema accepts that would crash mid-run (reflect padding, a forward pass)
    are refused at set-up, naming the keys and values; nothing is written."""
    from imgclf.core.errors import PipelineError

    with pytest.raises(PipelineError, match=message):
        run(cache_dir_8px, tmp_path, model, **train_kw)
    assert list(tmp_path.iterdir()) == []


def test_test_time_shift_must_be_smaller_than_the_images(cache_dir_8px, tmp_path):
    from imgclf.serve.evaluate import evaluate
    from imgclf.serve.export import export
    from imgclf.core.errors import PipelineError
    from imgclf.core.params import EvaluateParams

    run(cache_dir_8px, tmp_path / "train", epochs=1)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    outs = [tmp_path / "out/model.pt", tmp_path / "out/model_state.pt", tmp_path / "out/serving"]
    with pytest.raises(PipelineError, match=r"^export.tta_shift = 8 must be smaller than the images \(preprocess.image_size = 8"):
        export(tmp_path / "train/model.pt", *outs, images, formats=(), tta_shift=8)
    assert not (tmp_path / "out").exists()  # nothing written
    # 7 is smaller: it runs (seed_cnn_bn takes 8-pixel images), and evaluate applies it.
    export(tmp_path / "train/model.pt", *outs, images, formats=(), tta_shift=7)
    metrics = evaluate(outs[1], cache_dir_8px, EvaluateParams(), tmp_path / "eval.json", tmp_path / "p.csv")
    assert (metrics["tta_flip"], metrics["tta_shift"], metrics["num_test"]) == (False, 7, 50)


def test_weighted_test_time_views_travel_in_every_export(cache_dir, tmp_path):
    """export.tta_center_weight (airbench94's 2) is part of the model: the bundle carries it,
    the ONNX and .pt2 graphs agree with PyTorch, and evaluate applies it."""
    from imgclf.core.params import EvaluateParams
    from imgclf.models.bundle import load_state_dict_model as load_model
    from imgclf.serve.evaluate import evaluate
    from imgclf.serve.export import export

    run(cache_dir, tmp_path / "train", epochs=1)
    images = torch.load(cache_dir / "test.pt", weights_only=True)["images"][:8]
    outs = [tmp_path / "out/model.pt", tmp_path / "out/model_state.pt", tmp_path / "out/serving"]
    report = export(tmp_path / "train/model.pt", *outs, images, tta_flip=True, tta_shift=1, tta_center_weight=2.0)
    assert report["max_abs_diff_onnx"] <= report["tolerance"] and report["max_abs_diff_pt2"] <= report["tolerance"]
    model, bundle = load_model(outs[1])
    assert bundle["tta"] == {"flip": True, "shift": 1, "center_weight": 2.0}
    metrics = evaluate(outs[1], cache_dir, EvaluateParams(), tmp_path / "eval.json", tmp_path / "p.csv")
    assert (metrics["tta_shift"], metrics["tta_center_weight"]) == (1, 2.0)
    export(tmp_path / "train/model.pt", *outs, images, formats=(), tta_flip=True, tta_shift=1)
    assert "center_weight" not in load_model(outs[1])[1]["tta"]  # 1, the default: the bundle as before
    with torch.no_grad():
        assert not torch.allclose(load_model(outs[1])[0](images), model(images))


def test_hold_out_is_stratified_fixed_and_disjoint():
    from imgclf.cache.dataset import Split, hold_out

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 7)  # uneven classes
    split = Split(torch.arange(len(labels)).view(-1, 1, 1, 1).expand(-1, 3, 1, 1).to(torch.uint8), labels)
    torch.manual_seed(123)
    kept, held = hold_out(split, 0.1)
    torch.manual_seed(456)  # the global seed (train.seed) does not move the split
    kept2, held2 = hold_out(split, 0.1)
    assert torch.equal(held.images, held2.images) and torch.equal(kept.images, kept2.images)
    assert [int((held.labels == c).sum()) for c in range(3)] == [5, 3, 1]  # a tenth of each class, rounded
    ids = torch.cat([kept.images[:, 0, 0, 0], held.images[:, 0, 0, 0]]).sort().values
    assert torch.equal(ids, torch.arange(len(labels), dtype=torch.uint8))  # disjoint, nothing lost
    assert torch.equal(kept.labels, labels[kept.images[:, 0, 0, 0].long()])  # labels stay with images


def test_per_epoch_metrics_are_on_held_out_training_images_and_never_on_the_test_split(cache_dir, tmp_path):
    no_test = tmp_path / "cache"
    shutil.copytree(cache_dir, no_test)
    (no_test / "test.pt").unlink()  # train must not need it: only evaluate reads the test split
    metrics, _ = run(no_test, tmp_path / "run")
    assert (metrics["train_images"], metrics["val_images"]) == (180, 20)  # 200 images, val_fraction 0.1
    assert 0 <= metrics["val_acc"] <= 1 and metrics["val_loss"] > 0 and "test_acc" not in metrics
    header, *rows = (tmp_path / "run/curve.csv").read_text().splitlines()
    assert header.split(",")[3:5] == ["val_loss", "val_acc"] and len(rows) == 3
    assert float(rows[-1].split(",")[4]) == pytest.approx(metrics["val_acc"], abs=1e-6)


def test_without_validation_all_images_train_and_the_compute_is_counted(cache_dir, tmp_path):
    metrics, _ = run(cache_dir, tmp_path / "run", val_fraction=0.0)
    assert (metrics["train_images"], metrics["val_images"]) == (200, 0) and "val_acc" not in metrics
    header, *rows = (tmp_path / "run/curve.csv").read_text().splitlines()
    assert all(row.split(",")[3:5] == ["", ""] for row in rows)  # no held-out numbers to plot
    # seed_cnn_bn on 32-pixel images: 69.6 MFLOP forward + backward; 3 epochs of 8 batches of 25.
    assert metrics["gflop_per_image"] == pytest.approx(0.0696069, rel=1e-5)
    assert metrics["train_pflop"] == pytest.approx(0.0696069e9 * 200 * 3 / 1e15, rel=1e-5)
    assert metrics["tflop_per_s"] > 0
    # Each epoch's row has the compute spent so far: the x of the accuracy-per-compute plot.
    assert header.split(",")[-1] == "pflop"
    spent = [float(row.split(",")[-1]) for row in rows]
    assert spent == pytest.approx([0.0696069e9 * 200 * e / 1e15 for e in (1, 2, 3)], rel=1e-5)


def test_a_validation_split_that_leaves_nothing_is_refused(cache_dir, tmp_path):
    from imgclf.core.errors import PipelineError

    with pytest.raises(PipelineError, match=r"train.val_fraction = 0.01 of 200 training images leaves 200 to train on and 0"):
        run(cache_dir, tmp_path / "run", val_fraction=0.01)
