"""The recipes (recipes/*.yaml) are defined once: the Makefile, the bench and the GPU check
read them through imgclf.recipes, and a bad one is one line before anything runs."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from imgclf import recipes
from imgclf.bench.feeders import RECIPES
from imgclf.core.errors import PipelineError
from imgclf.core.params import load_params, parse_params, read_yaml

from helpers import ROOT


@pytest.mark.parametrize("name", recipes.names())
def test_each_recipe_is_valid_params_laid_over_params_yaml(name):
    args = recipes.set_args(name, params=ROOT / "params.yaml")
    assert args[0::2] == ["-S"] * (len(args) // 2)
    overlay = recipes.flatten(recipes.load(name))
    assert [a.split("=", 1)[0] for a in args[1::2]] == list(overlay)
    # Every key is a params key that params.yaml itself holds: DVC's -S sets only keys the file has
    # ("Could not override 'train.onecycle_start'" otherwise).
    base = recipes.flatten(read_yaml(ROOT / "params.yaml"))
    assert set(overlay) <= set(base), (name, set(overlay) - set(base))
    assert set(base) == set(recipes.flatten(load_params(ROOT / "params.yaml").model_dump()))  # every schema key


def test_the_recipes_are_the_ones_documented():
    assert recipes.names() == ["airbench94", "demo", "fast", "muon", "speed"]
    documented = (ROOT / "docs" / "recipes.md").read_text()
    assert all(f"recipes/{name}.yaml" in documented for name in recipes.names())


def test_muon_is_airbench94_in_8_epochs_with_muon_on_the_filters():
    airbench, muon = recipes.flatten(recipes.load("airbench94")), recipes.flatten(recipes.load("muon"))
    assert {k: v for k, v in muon.items() if muon[k] != airbench.get(k)} == {
        "train.epochs": 8, "train.optimizer": "muon", "train.muon_lr": 0.16, "train.muon_momentum": 0.6,
        "train.muon_normalize": True}


def test_airbench94_is_the_speed_recipe_and_airbench94s_details():
    speed, airbench = recipes.flatten(recipes.load("speed")), recipes.flatten(recipes.load("airbench94"))
    assert {k: v for k, v in airbench.items() if k in speed} == speed
    assert {k: v for k, v in airbench.items() if k not in speed} == {
        "train.onecycle_start": 0.2, "train.onecycle_peak": 0.23, "train.onecycle_end": 0.07,
        "train.whiten_bias_epochs": 3, "train.whiten_bias_lr": "weights", "train.decay_biases": True,
        "export.tta_center_weight": 2}


def test_a_recipe_on_a_base_holds_what_differs_and_a_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.1\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain:\n  epochs: 5\n")
    assert recipes.set_args("b", params=ROOT / "params.yaml", folder=tmp_path) == [
        "-S", "train.lr=0.1", "-S", "train.epochs=5"]
    (tmp_path / "a.yaml").write_text("base: b\n")
    with pytest.raises(PipelineError, match=r"recipe 'b': its bases loop \(b -> a -> b\)"):
        recipes.load("b", tmp_path)


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv/bin/python").exists(),
                    reason="needs make and the project's .venv (make install)")
@pytest.mark.parametrize("target,name,extra", [("speedrun", "speed", ["-S", "train.val_fraction=0.1"]),
                                               ("muonrun", "muon", ["-S", "train.val_fraction=0.1"]),
                                               ("fast", "fast", ["-S", "train.val_fraction=0"]),
                                               ("demo", "demo", [])])
def test_make_passes_the_recipe_to_dvc_as_written(target, name, extra):
    """`make -n` prints the command; run through the shell as make runs it, it hands dvc the
    recipe's arguments, the VAL value last, in a temporary copy (the workspace untouched)."""
    vals = ["VAL=0.1"] if target in ("speedrun", "muonrun") else []
    printed = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), target, *vals], capture_output=True, text=True,
                             check=True).stdout
    line = next(line for line in printed.splitlines() if "dvc exp run" in line)
    # What the shell hands dvc: replace dvc with a printer of its arguments.
    shown = subprocess.run(["bash", "-c", line.replace("dvc exp run", 'printf "%s\\n"', 1)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown[0] == "--temp"
    expected = recipes.set_args(name, [e for e in extra[1::2]], params=ROOT / "params.yaml")
    assert [a for a in shown if a not in ("--temp", "-n", "demo")] == expected


def test_the_bench_measures_the_fast_recipe_as_make_fast_trains_it():
    fast = next(r for r in RECIPES if r.name == "fast")
    values = recipes.flatten(recipes.load("fast"))
    assert (fast.arch, fast.width, fast.batch, fast.lr, fast.label_smoothing) == (
        values["model.arch"], values["model.width"], values["train.batch_size"], values["train.lr"],
        values["train.label_smoothing"])


def test_a_bad_recipe_is_one_line_naming_its_file(tmp_path):
    (tmp_path / "typo.yaml").write_text("train:\n  lrr: 0.1\n")
    (tmp_path / "range.yaml").write_text("train:\n  epochs: 0\n")
    with pytest.raises(PipelineError, match=r"typo\.yaml.*unknown key 'train\.lrr'"):
        recipes.set_args("typo", params=ROOT / "params.yaml", folder=tmp_path)
    with pytest.raises(PipelineError, match=r"range\.yaml.*train\.epochs"):
        recipes.set_args("range", params=ROOT / "params.yaml", folder=tmp_path)
    with pytest.raises(PipelineError, match="no recipe 'nope'.*recipes: range, typo"):
        recipes.set_args("nope", folder=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "imgclf.recipes", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    # A -S value that overrides the recipe is checked too.
    with pytest.raises(PipelineError, match="train.lr"):
        recipes.set_args("speed", ["train.lr=-1"], params=ROOT / "params.yaml")
    assert parse_params({"train": {"lr": 1.5}}).train.lr == 1.5
