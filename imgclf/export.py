"""Saving and loading models both ways (tutorial §4.10).

* ``torch.save(model)`` pickles the whole module. Loading needs ``weights_only=False``, which
  runs arbitrary code from the file, and the model's classes importable (``imgclf``): for
  files you trust only.
* ``torch.save(state_dict)`` stores tensors only, loadable with ``weights_only=True``. Our
  file also carries what is needed to rebuild and use the model: the architecture name and
  arguments, class names and the normalisation mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .files import PipelineError, atomic_path
from .models import Classifier, build

FORMAT = "imgclf-state-dict"
VERSION = 1


def make_bundle(model: Classifier, *, arch: str, arch_args: dict[str, Any], classes: list[str],
                mean: list[float], std: list[float], image_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "arch_args": dict(arch_args),
        "classes": list(classes),
        "mean": list(mean),
        "std": list(std),
        "image_size": int(image_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_state_bundle(bundle: dict[str, Any], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)


def save_whole_model(model: Classifier, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(model, tmp)


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state_dict file safely (``weights_only=True``: tensors and plain data only)."""
    path = Path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such model file (run `dvc repro export`)") from None
    except Exception as e:
        raise PipelineError(f"{path}: not a loadable state_dict file ({type(e).__name__}: {e})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise PipelineError(f"{path}: not an {FORMAT} file (missing 'format': {FORMAT!r})")
    if bundle.get("version") != VERSION:
        raise PipelineError(f"{path}: format version {bundle.get('version')} is not supported (expected {VERSION})")
    return bundle


def model_from_bundle(bundle: dict[str, Any]) -> Classifier:
    args = dict(bundle["arch_args"])
    args.pop("pretrained", None)  # the trained weights replace any pretrained ones
    model = build(bundle["arch"], args, bundle["mean"], bundle["std"])
    model.load_state_dict(bundle["state_dict"])
    return model.eval()


def load_state_dict_model(path: str | os.PathLike) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from a state_dict file; returns ``(model, bundle)``."""
    bundle = read_bundle(path)
    return model_from_bundle(bundle), bundle


def load_whole_model(path: str | os.PathLike) -> Classifier:
    """Unpickle a whole-model file. Runs code from the file: trusted files only."""
    return torch.load(path, map_location="cpu", weights_only=False).eval()


# --- The export stage --------------------------------------------------------------------


def _logits_of_both(whole_path: str, state_path: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)  # identical reduction order in both processes
    with torch.no_grad():
        whole = load_whole_model(whole_path)
        state, _ = load_state_dict_model(state_path)
        return {"whole": whole(images), "state": state(images)}


def verify_in_fresh_process(whole_path: Path, state_path: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load both files in a new Python process and return the logits each gives on ``images``.

    A fresh process proves the files stand alone: nothing of this process's state (the
    model object, imported-but-unsaved classes) can make them look loadable.
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(images, inp)
        code = (
            "import sys, torch; from imgclf.export import _logits_of_both; "
            "torch.save(_logits_of_both(sys.argv[1], sys.argv[2], torch.load(sys.argv[3])), sys.argv[4])"
        )
        # -I: isolated, so the current folder cannot shadow the installed package.
        proc = subprocess.run([sys.executable, "-I", "-c", code, str(whole_path), str(state_path), str(inp), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"the exported models do not reload in a fresh process:\n{proc.stderr.strip()}")
        return torch.load(out, weights_only=True)


def export(model_in: str | os.PathLike, whole_out: str | os.PathLike, state_out: str | os.PathLike,
           images: torch.Tensor) -> dict[str, Any]:
    """Write both exports, prove they reload in a fresh process and agree on ``images``."""
    bundle = read_bundle(model_in)
    model = model_from_bundle(bundle)
    torch.set_num_threads(1)
    with torch.no_grad():
        expected = model(images)
    whole_out, state_out = Path(whole_out), Path(state_out)
    with atomic_path(whole_out) as whole_tmp, atomic_path(state_out) as state_tmp:
        torch.save(model, whole_tmp)
        torch.save(bundle, state_tmp)
        got = verify_in_fresh_process(whole_tmp, state_tmp, images)
        diffs = {k: (v - expected).abs().max().item() for k, v in got.items()}
        if not all(torch.equal(v, expected) for v in got.values()):
            raise PipelineError(f"reloaded models disagree with the trained one: max |diff| {diffs}")
    return {
        "verified_images": len(images),
        "max_abs_diff_whole": diffs["whole"],
        "max_abs_diff_state_dict": diffs["state"],
        "whole_model_bytes": whole_out.stat().st_size,
        "state_dict_bytes": state_out.stat().st_size,
    }
