"""The speed recipe's parts (`make speedrun`, docs/recipes.md): the whitening layer, identity
init, frozen batch-norm scales with fast biases, alternating flips, lookahead; and the whole
recipe training, learning and resuming bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from imgclf.core.errors import PipelineError
from imgclf.core.params import AugmentParams, ModelParams, TrainParams, parse_params
from imgclf.models import registry as models
from imgclf.models.archs.whitened_net import Whitening, fit_whitening
from imgclf.train.augment import Augmenter
from imgclf.train.lookahead import Lookahead
from imgclf.train.loop import TrainPaths, train
from imgclf.train.trainee import make_optimizer

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def whitened(width: int = 8) -> models.Classifier:
    args = models.arch_args(ModelParams(arch="whitened_net", width=width), num_classes=10, image_size=32)
    return models.build("whitened_net", args, MEAN, STD)


def test_the_whitening_layer_decorrelates_the_patches_it_was_fitted_on():
    # Correlated channels and neighbours: smooth random images with a shared component.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 1, 16, 16, generator=g)
    x = torch.cat([base, base + 0.3 * torch.randn(200, 1, 16, 16, generator=g), torch.randn(200, 1, 16, 16, generator=g)], 1)
    x = nn.functional.avg_pool2d(x, 3, 1, 1)
    layer = Whitening(3)
    fit_whitening(layer, x, eps=0.0)
    with torch.no_grad():
        out = nn.functional.conv2d(x, layer.weight)  # the filters alone, no bias
    first = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = first.T @ first / len(first)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.double), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # the second half is the negatives
    raw = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    assert (raw.T @ raw / len(raw) - torch.eye(12, dtype=torch.double)).abs().max() > 0.5  # it was not white


def test_training_fits_the_whitening_layer_to_the_training_images_and_freezes_it():
    model = whitened()
    before = model.net.whiten.weight.clone()
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    models.fit_to_data("whitened_net", model, images)
    assert not torch.equal(model.net.whiten.weight, before)
    assert not model.net.whiten.weight.requires_grad and model.net.whiten.bias.requires_grad
    # The model without a whitening layer is left as it was.
    plain = models.build("seed_cnn_bn", models.arch_args(ModelParams(), num_classes=10, image_size=32), MEAN, STD)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    models.fit_to_data("seed_cnn_bn", plain, images)
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


def test_convolutions_start_as_identities_and_batch_norm_trains_only_its_biases_faster():
    model = whitened(width=8)
    block = model.net.block2  # 8 -> 32 channels
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(nn.functional.conv2d(x, block.conv1.weight, padding=1)[:, :8], x)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    opt = make_optimizer(model, TrainParams(lr=0.5, weight_decay=0.01, bias_lr_scale=64))
    weights, biases = opt.param_groups
    assert (weights["lr"], weights["weight_decay"], biases["lr"], biases["weight_decay"]) == (0.5, 0.01, 32.0, 0.0)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.weight) not in in_groups for m in norms)  # frozen scales are not optimised
    assert id(model.net.whiten.bias) in in_groups and id(model.net.whiten.weight) not in in_groups


def test_airbench94s_bias_rules_are_params():
    model = whitened()
    whiten_bias = models.whiten_bias("whitened_net", model)
    assert [p is model.net.whiten.bias for p in whiten_bias] == [True]
    # decay_biases: biases and norm parameters decay by the weights' share per step (lr x wd).
    weights, biases = make_optimizer(model, TrainParams(lr=1.5, weight_decay=0.0013, bias_lr_scale=64,
                                                        decay_biases=True)).param_groups
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])
    # whiten_bias_lr weights: the whitening bias learns at lr in a group of its own, as airbench94's.
    groups = make_optimizer(model, TrainParams(lr=1.5, weight_decay=0.0013, bias_lr_scale=64, decay_biases=True,
                                               whiten_bias_lr="weights"), whiten_bias).param_groups
    assert [g["params"] for g in groups[2:]] == [whiten_bias]
    assert (groups[2]["lr"], groups[2]["weight_decay"]) == (1.5, 0.0013)
    assert all(p is not model.net.whiten.bias for p in groups[1]["params"])


def test_the_whitening_bias_trains_for_whiten_bias_epochs_then_stays():
    from imgclf.train.trainee import make_step

    torch.manual_seed(0)
    model = whitened()
    step = make_step(model, TrainParams(epochs=3, lr=0.5, schedule="constant", whiten_bias_epochs=1), torch.device("cpu"), None,
                     total_steps=6, steps_per_epoch=2, whiten_bias=models.whiten_bias("whitened_net", model))
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    seen = [model.net.whiten.bias.detach().clone()]
    for _ in range(6):
        step(x, y)
        seen.append(model.net.whiten.bias.detach().clone())
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])  # epoch 1: it learns
    assert all(torch.equal(b, seen[2]) for b in seen[3:])  # epochs 2 and 3: frozen
    assert not torch.equal(model.net.block1.norm1.bias, torch.zeros_like(model.net.block1.norm1.bias))


@pytest.mark.parametrize("kw,message", [
    ({"whiten_bias_epochs": 3}, "train.whiten_bias_epochs = 3: model.arch 'seed_cnn_bn' has no whitening layer; set it to 0"),
    ({"whiten_bias_lr": "weights"}, "train.whiten_bias_lr = 'weights': model.arch 'seed_cnn_bn' has no whitening layer"),
])
def test_whitening_params_on_a_net_without_one_are_refused(kw, message):
    from imgclf.train.trainee import build_trainee

    with pytest.raises(PipelineError, match=re.escape(message)):
        build_trainee(ModelParams(), TrainParams(**kw), num_classes=10, image_size=32, mean=MEAN, std=STD,
                      device=torch.device("cpu"), amp=None, steps_per_epoch=2)

def test_muon_takes_the_conv_filters_as_2d_views_and_leaves_the_rest_to_sgd():
    model = whitened()
    opt = make_optimizer(model, TrainParams(optimizer="muon", lr=0.5, weight_decay=0.01, bias_lr_scale=64, muon_lr=0.07))
    weights, biases, filters = opt.param_groups
    assert (weights["lr"], biases["lr"], filters["lr"]) == (0.5, 32.0, 0.07)
    trainable_filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    assert all(p.ndim == 2 for p in weights["params"])  # the head only: no filter goes to SGD
    assert [v.shape for v in filters["params"]] == [(p.shape[0], p[0].numel()) for p in trainable_filters]
    assert all(v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()  # views: Muon's step moves the filters
               for v, p in zip(filters["params"], trainable_filters))
    with pytest.raises(PipelineError, match="train.optimizer = 'muon': the model has no convolution filters"):
        make_optimizer(nn.Linear(4, 2), TrainParams(optimizer="muon"))


def test_muon_steps_alike_in_both_memory_formats():
    # channels_last stores a filter bank as (out, kh, kw, in): the view's columns come in that
    # order, and the orthogonalised update does not depend on their order.
    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, 8, 3, 3, generator=g)
    after = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        conv = nn.Conv2d(8, 16, 3, bias=False).to(memory_format=fmt)
        with torch.no_grad():
            conv.weight.copy_(weight)
        opt = make_optimizer(conv, TrainParams(optimizer="muon", muon_lr=0.1))
        for _ in range(2):  # the second step also uses the momentum of the first
            opt.zero_grad()
            (conv.weight * grad).sum().backward()  # the gradient is `grad`, in the weight's layout
            opt.step()
        after.append(conv.weight.detach().contiguous())
    assert not torch.allclose(after[0], weight, atol=1e-3)  # the filters did move
    torch.testing.assert_close(after[1], after[0], rtol=1e-5, atol=1e-6)


def test_muon_normalize_holds_each_filter_bank_at_norm_sqrt_out():
    # airbench94_muon's weight normalisation: before each Muon step every bank is rescaled to
    # norm sqrt(out channels); without it the banks keep the norm their init and steps give them.
    for normalize in (False, True):
        model = whitened()
        opt = make_optimizer(model, TrainParams(optimizer="muon", muon_lr=1e-6, muon_normalize=normalize))
        filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        norms = torch.tensor([p.norm().item() for p in filters])
        target = torch.tensor([p.shape[0] ** 0.5 for p in filters])
        assert torch.allclose(norms, target, rtol=1e-4) == normalize, (normalize, norms, target)


def test_alternating_flips_show_every_image_both_ways_every_two_epochs():
    images = torch.randint(0, 256, (400, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = Augmenter(images, crop_padding=0, flip="alternate", seed=3)
    index = torch.randperm(400, generator=torch.Generator().manual_seed(1))

    def flipped(epoch: int) -> torch.Tensor:
        out = aug(index, torch.Generator().manual_seed(epoch), epoch)
        mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images[index])])
        same = torch.tensor([torch.equal(o, i) for o, i in zip(out, images[index])])
        assert bool((mirrored | same).all())
        return mirrored & ~same  # images symmetric under the flip count as neither

    e0, e1, e2 = flipped(0), flipped(1), flipped(2)
    assert 150 < int(e0.sum()) < 250 and not bool((e0 & e1).any()) and bool((e0 | e1).sum() >= 395)
    assert torch.equal(e0, e2)
    other_seed = Augmenter(images, crop_padding=0, flip="alternate", seed=4)
    assert not torch.equal(other_seed(index, torch.Generator().manual_seed(0), 0), aug(index, torch.Generator().manual_seed(0), 0))


@pytest.mark.parametrize("value,ok", [("alternate", True), (True, True), (False, True), ("random", False), (1, False)])
def test_flip_takes_true_false_or_alternate(value, ok):
    raw = {"train": {"augment": {"flip": value}}}
    if ok:
        assert parse_params(raw).train.augment.flip == value
    else:
        with pytest.raises(Exception, match=r"train.augment.flip = .*: must be true, false or alternate"):
            parse_params(raw)


def test_lookahead_pulls_back_harder_as_training_ends_and_ends_on_the_average():
    net = nn.Linear(1, 1, bias=False).requires_grad_(False)
    net.weight.fill_(0.0)
    la = Lookahead(net, total_steps=12, every=5)
    assert la.decay(0) == 0 and la.decay(12) == pytest.approx(0.95**5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    la.after_step(5)  # early: the average (0, the initial weight) nearly follows the weights
    early = net.weight.item()
    assert early == pytest.approx(1 - la.decay(5)) and la.average["weight"].item() == early
    with torch.no_grad():
        net.weight.fill_(10.0)
    la.after_step(10)  # later: pulled back harder
    d = la.decay(10)
    assert net.weight.item() == pytest.approx(d * early + (1 - d) * 10.0)
    with torch.no_grad():
        net.weight.fill_(50.0)
    la.after_step(11)  # not a lookahead step: untouched
    assert net.weight.item() == 50.0
    la.after_step(12)  # the last step: the weights become the average
    assert net.weight.item() == float(la.average["weight"]) == pytest.approx(d * early + (1 - d) * 10.0)


# The recipe's parts at a learning rate this tiny task trains stably with: at airbench's scale
# (lr 0.4 here) seeds 0-11 ranged from 0.14 to 0.86 on these 100 held-out images; at 0.2 from
# 0.67 to 0.84 (2-core Xeon, fp32). The bar sits 17 images below the lowest.
RECIPE = dict(epochs=4, batch_size=50, lr=0.2, momentum=0.85, weight_decay=0.005, bias_lr_scale=64.0,
              label_smoothing=0.2, lookahead=True, augment=AugmentParams(crop_padding=2, flip="alternate"),
              threads=1, device="cpu", precision="fp32", val_fraction=0.2)
LEARNS = 0.5


# train.optimizer muon at its defaults (muon_lr 0.05, momentum 0.95), seeds 0-5 on the same
# 100 images: 0.60 to 0.85 (AMD EPYC, fp32); LEARNS sits 10 images below the lowest.
MUON = dict(optimizer="muon")


def run(learn_cache_dir: Path, out: Path, **train_kw) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    paths = TrainPaths(learn_cache_dir, out / "model.pt", out / "train.json", out / "curve.csv", out / "ckpt.pt", None, None)
    metrics = train(ModelParams(arch="whitened_net", width=8), TrainParams(**(RECIPE | train_kw)), paths)
    return metrics, torch.load(out / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("optimizer", [{}, MUON], ids=["sgd", "muon"])
def test_the_speed_recipe_learns_and_an_interrupted_run_resumes_bit_for_bit(learn_cache_dir, tmp_path, monkeypatch,
                                                                          optimizer):
    whole, whole_state = run(learn_cache_dir, tmp_path / "whole", **optimizer)
    assert whole["val_images"] == 100 and whole["val_acc"] > LEARNS  # chance is 0.1
    assert whole["gflop_per_image"] > 0 and whole["train_pflop"] > 0

    import imgclf.train.loop as train_module

    real_epoch = train_module.one_epoch

    def interrupted_in_epoch_3(run_, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(run_, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "one_epoch", interrupted_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(learn_cache_dir, tmp_path / "resumed", **optimizer)
    assert (tmp_path / "resumed" / "ckpt.pt").exists()
    if optimizer:  # the checkpoint holds Muon's momentum, one buffer per filter bank
        state = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"]["optimizer"]
        filters = [p for p in whitened().parameters() if p.ndim == 4 and p.requires_grad]
        assert [tuple(s["momentum_buffer"].shape) for s in state["muon"]["state"].values()] == [
            (p.shape[0], p[0].numel()) for p in filters]
    monkeypatch.setattr(train_module, "one_epoch", real_epoch)
    resumed, resumed_state = run(learn_cache_dir, tmp_path / "resumed", **optimizer)
    assert resumed["val_acc"] == whole["val_acc"] and resumed["train_loss"] == whole["train_loss"]
    assert all(torch.equal(resumed_state[k], whole_state[k]) for k in whole_state)


def test_make_speedrun_runs_the_recipe_as_a_dvc_experiment(project):
    """What `make speedrun` runs (printed by `make -n`: recipes/speed.yaml as -S values, then
    `dvc exp run --temp`), run in the project with only the epochs cut through R=: every value
    parses as DVC writes it, trains, exports with its TTA; params.yaml is left as it was."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    printed = subprocess.run(["make", "-s", "-n", "-C", str(root), "speedrun", "VAL=0.1", "R=-n speed -S train.epochs=2"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert "-m imgclf.recipes speed -S train.val_fraction=0.1" in printed and "dvc exp run --temp" in printed
    before = (project.path / "params.yaml").read_text()
    interpreter = printed.split(" -m imgclf.recipes")[0].split("$(")[-1]
    project.run("bash", "-c", printed.replace(interpreter, sys.executable).replace("dvc exp", f"{sys.executable} -m dvc exp"))
    assert (project.path / "params.yaml").read_text() == before
    project.dvc("exp", "apply", "speed")
    trained = json.loads((project.path / "metrics/train.json").read_text())
    show = json.loads(project.dvc("exp", "show", "--json").stdout)
    rev = next(r for row in show for e in row.get("experiments") or [] for r in e["revs"] if r["name"] == "speed")
    p = rev["data"]["params"]["params.yaml"]["data"]
    assert (p["model"]["arch"], p["train"]["augment"]["flip"], p["train"]["lookahead"], p["train"]["bias_lr_scale"]) \
        == ("whitened_net", "alternate", True, 64)
    assert (p["train"]["batch_size"], p["export"]["tta_flip"], p["export"]["tta_shift"]) == (1024, True, 1)
    # 200 tiny images, 20 held out: one batch of all 180 per epoch, 0.708 GFLOP each.
    assert trained["train_images"] == 180 and trained["gflop_per_image"] == pytest.approx(0.707777, rel=1e-5)
    assert trained["train_pflop"] == pytest.approx(0.707777e9 * 180 * 2 / 1e15, rel=1e-5)
    assert 0 <= rev["data"]["metrics"]["metrics/eval.json"]["data"]["test_acc"] <= 1
    bundle = torch.load(project.path / "models/model_state.pt", weights_only=True)
    assert bundle["arch"] == "whitened_net" and bundle["tta"] == {"flip": True, "shift": 1}


def test_run_fp32_runs_a_peer_script_with_autocast_off(tmp_path):
    """tools/run_fp32.py: the script runs as __main__ with its own argv, and its bf16
    autocast blocks compute in fp32."""
    import subprocess
    import sys

    script = tmp_path / "peer.py"
    script.write_text(
        "import sys, torch\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y = torch.ones(2, 2) @ torch.ones(2, 2)\n"
        "print(__name__, sys.argv[1:], y.dtype)\n"
    )
    tool = Path(__file__).resolve().parents[1] / "tools/run_fp32.py"
    plain = subprocess.run([sys.executable, str(script), "a"], capture_output=True, text=True, check=True).stdout
    assert plain.split() == ["__main__", "['a']", "torch.bfloat16"]
    fp32 = subprocess.run([sys.executable, str(tool), str(script), "a"], capture_output=True, text=True, check=True).stdout
    assert fp32.split() == ["__main__", "['a']", "torch.float32"]


PORT = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "airbench94_cpu.py"


@pytest.mark.skipif(not PORT.is_file(), reason="needs ../shared/anchors/airbench94_cpu.py")
def test_step_ratio_times_our_step_and_the_ports_in_turn(cache_dir, tmp_path):
    """tools/step_ratio.py at a tiny batch: each side measured in its own process, the port
    unchanged, a ratio per variant of ours (docs/speed.md has the measurements at batch 1024)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "tools/step_ratio.py", "--port", str(PORT), "--cache", str(cache_dir),
                          "--precision", "fp32", "--batch", "32", "--warmup", "1", "--steps", "2", "--repeats", "1",
                          "--ours", "speed", "--ours", "nchw:train.channels_last=false", "--json", str(tmp_path / "r.json")],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["batch"] == 32 and len(result["port"]) == 1 and result["port"][0] > 0
    assert result["ours"]["nchw"]["values"] == "train.channels_last=false"
    for name in ("speed", "nchw"):
        (ours,) = result["ours"][name]["seconds_per_step"]
        assert ours > 0 and result["ours"][name]["ratio"] == pytest.approx(ours / result["port"][0])
        assert re.search(rf"^{name} +{ours:.3f} +{ours / result['port'][0]:.2f}$", out.stdout, re.M), out.stdout


@pytest.mark.parametrize("side", ["port", "speed"])
def test_step_ratio_profile_says_where_a_step_goes(cache_dir, side):
    """tools/step_ratio.py --profile: one side's timed steps, op by op, and the rate of its
    convolutions over the FLOPs the pipeline counts for the step (docs/speed.md)."""
    import subprocess
    import sys

    from imgclf.models.shapes import train_flops_per_image

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "tools/step_ratio.py", "--port", str(PORT), "--cache", str(cache_dir),
                          "--precision", "fp32", "--batch", "32", "--warmup", "1", "--steps", "2", "--profile", side],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    head = re.search(rf"^{side}, fp32, batch 32: ([0-9.]+) s/step \(profiled, 2 steps\); self CPU time per step ([0-9.]+) s$",
                     out.stdout, re.M)
    assert head, out.stdout
    # Every op's self time, summed, is the step: the profile covers exactly the timed steps.
    assert float(head[2]) == pytest.approx(float(head[1]), rel=0.25)
    shares = [float(s) for s in re.findall(r"^aten::\S+ +[0-9.]+ +([0-9.]+)%$", out.stdout, re.M)]
    assert "aten::convolution_backward" in out.stdout and 0 < sum(shares) <= 100.05, out.stdout
    conv = re.search(r"^convolutions: (\d+)% of the step; forward ([0-9.]+) GFLOP in [0-9.]+ s = (\d+) GFLOP/s, "
                     r"backward ([0-9.]+) GFLOP", out.stdout, re.M)
    assert conv and 0 < int(conv[1]) <= 100 and int(conv[3]) > 0, out.stdout
    flops = train_flops_per_image(ModelParams(arch="whitened_net", width=64), num_classes=10, image_size=32) * 32 / 1e9
    assert float(conv[2]) + float(conv[4]) == pytest.approx(flops, rel=0.02)
