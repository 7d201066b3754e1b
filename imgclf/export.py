"""The export stage's work: both files of tutorial §4.10, proven to reload and agree.

``models/model.pt`` is ``torch.save(model)``; ``models/model_state.pt`` the state_dict bundle
of :mod:`imgclf.bundle`. Both are loaded in a fresh Python process and must give the trained
model's logits exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .bundle import load_state_dict_model, load_whole_model, model_from_bundle, read_bundle
from .files import PipelineError, atomic_path


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
