"""The export stage's work: every model file, proven in a fresh process to reload and agree.

``models/model.pt`` is ``torch.save(model)`` and ``models/model_state.pt`` the state_dict
bundle of :mod:`imgclf.models.bundle` (tutorial §4.10): both must give the trained model's logits
exactly. ``models/serving/`` holds the files a serving stack loads without our code
(:mod:`imgclf.serve.serving`): ``model.onnx`` and ``model.pt2``, each when its param is on; their
logits must lie within ``export.tolerance`` of PyTorch's, since another runtime may sum in
another order.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cache.dataset import load_cache
from ..core.errors import PipelineError, describe_os_error
from ..core.files import atomic_path, save_torch, write_json
from ..core.params import ExportParams
from ..core.paths import ExportPaths
from ..models.bundle import load_state_dict_model, load_whole_model, model_from_bundle, read_bundle
from ..models.tta import with_tta
from . import serving

log = logging.getLogger(__name__)


def _logits_of_files(files: dict[str, str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``files``: kind (whole, state, onnx, pt2) -> path. Runs in the fresh process."""
    torch.set_num_threads(1)  # identical reduction order in both processes
    out = {}
    with torch.no_grad():
        for kind, path in files.items():
            if kind == "whole":
                out[kind] = load_whole_model(path)(images)
            elif kind == "state":
                out[kind] = load_state_dict_model(path)[0](images)
            else:
                out[kind] = serving.logits(kind, path, images)
    return out


def verify_in_fresh_process(files: dict[str, Path], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load each file in a new Python process and return the logits each gives on ``images``.

    A fresh process proves the files stand alone: nothing of this process's state (the
    model object, imported-but-unsaved classes) can make them look loadable.
    """
    try:
        tmp_dir = tempfile.TemporaryDirectory(prefix="imgclf-export-check-")
    except OSError as e:
        raise PipelineError(f"cannot make the export check's temporary folder in {tempfile.gettempdir()}: "
                            f"{describe_os_error(e)} (set TMPDIR to a folder with room)") from None
    with tmp_dir as tmp:
        inp, out = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        try:
            save_torch(images, inp)
        except OSError as e:
            raise PipelineError(f"cannot write the export check's images to {inp}: {describe_os_error(e)} "
                                f"(is {tempfile.gettempdir()} full? set TMPDIR to a folder with room)") from None
        code = (
            "import sys; sys.argv[4] in sys.path or sys.path.insert(0, sys.argv[4]); "
            "import json, torch; from imgclf.serve.export import _logits_of_files; "
            "torch.save(_logits_of_files(json.loads(sys.argv[1]), torch.load(sys.argv[2])), sys.argv[3])"
        )
        paths = json.dumps({k: str(v) for k, v in files.items()})
        # -I: isolated, so neither the current folder nor PYTHON* variables can change what is
        # imported. The one folder added is the one holding this very imgclf: the fresh process
        # runs the same code, installed or from a checkout on PYTHONPATH (which -I ignores).
        package_root = str(Path(__file__).resolve().parents[2])
        proc = subprocess.run([sys.executable, "-I", "-c", code, paths, str(inp), str(out), package_root],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"the exported models do not reload in a fresh process:\n{proc.stderr.strip()}")
        return torch.load(out, weights_only=True)


def check_agreement(expected: torch.Tensor, got: dict[str, torch.Tensor], tolerance: float) -> dict[str, float]:
    """Max |logit difference| per file; the PyTorch files must agree exactly, the serving
    formats within ``tolerance``."""
    diffs = {k: (v.float() - expected).abs().max().item() for k, v in got.items()}
    exact = [k for k in got if k in ("whole", "state") and not torch.equal(got[k], expected)]
    if exact:
        raise PipelineError(f"reloaded models disagree with the trained one: max |diff| {diffs}")
    loose = [k for k in got if k not in ("whole", "state") and not diffs[k] <= tolerance]  # NaN fails too
    if loose:
        raise PipelineError(
            "the " + " and ".join(f"{k} file (max |logit diff| {diffs[k]:.3g})" for k in loose)
            + f" disagree{'s' if len(loose) == 1 else ''} with PyTorch beyond export.tolerance = {tolerance:g}"
        )
    return diffs


def export(model_in: str | os.PathLike, whole_out: str | os.PathLike, bundle_out: str | os.PathLike,
           serving_out: str | os.PathLike, images: torch.Tensor, *, formats: Sequence[str] = serving.FORMATS,
           tolerance: float = 1e-3, tta_flip: bool = False, tta_shift: int = 0,
           tta_center_weight: float = 1.0) -> dict[str, Any]:
    """Write every export, prove each reloads in a fresh process and agrees on ``images``.

    ``serving_out`` is a folder holding one file per format in ``formats`` (none: empty).
    With test-time augmentation on, every file holds or rebuilds the averaging module
    (:mod:`imgclf.models.tta`): they all give the augmented logits.
    """
    bundle = read_bundle(model_in)
    if tta_shift >= bundle["image_size"]:  # reflect padding must be narrower than the image
        raise PipelineError(f"export.tta_shift = {tta_shift} must be smaller than the images "
                            f"(preprocess.image_size = {bundle['image_size']}, in {model_in})")
    bundle["tta"] = {"flip": tta_flip, "shift": tta_shift}
    if tta_shift and tta_center_weight != 1.0:  # only then does it change the views' average
        bundle["tta"]["center_weight"] = float(tta_center_weight)
    model = with_tta(model_from_bundle(bundle), bundle["tta"]).eval()
    torch.set_num_threads(1)
    with torch.no_grad():
        expected = model(images)
    whole_out, bundle_out, serving_out = Path(whole_out), Path(bundle_out), Path(serving_out)
    meta = serving.metadata(bundle)
    with atomic_path(whole_out) as whole_tmp, atomic_path(bundle_out) as state_tmp, \
            atomic_path(serving_out, is_dir=True) as serving_tmp:
        save_torch(model, whole_tmp)
        save_torch(bundle, state_tmp)
        files = {"whole": whole_tmp, "state": state_tmp, **serving.write(model, serving_tmp, formats, meta)}
        diffs = check_agreement(expected, verify_in_fresh_process(files, images), tolerance)
    report: dict[str, Any] = {
        "verified_images": len(images),
        "max_abs_diff_whole": diffs["whole"],
        "max_abs_diff_state_dict": diffs["state"],
        "whole_model_bytes": whole_out.stat().st_size,
        "state_dict_bytes": bundle_out.stat().st_size,
    }
    for fmt in formats:
        report[f"max_abs_diff_{fmt}"] = diffs[fmt]
        report[f"{fmt}_bytes"] = (serving_out / serving.FILE_NAMES[fmt]).stat().st_size
    if formats:
        report["tolerance"] = tolerance
    return report


def run(export_params: ExportParams, paths: ExportPaths) -> dict[str, Any]:
    """The export stage: every model file from the trained bundle, each proven on the first
    ``export.check_batch`` test images; the report goes to ``paths.metrics_out``."""
    images = load_cache(paths.cache_dir, splits=("test",)).test.images[: export_params.check_batch].clone()
    formats = [f for f in serving.FORMATS if getattr(export_params, f)]
    report = export(paths.trained, paths.whole_model, paths.bundle, paths.serving_dir, images, formats=formats,
                    tolerance=export_params.tolerance, tta_flip=export_params.tta_flip,
                    tta_shift=export_params.tta_shift, tta_center_weight=export_params.tta_center_weight)
    write_json(paths.metrics_out, report)
    written = [paths.whole_model, paths.bundle, *(paths.serving_dir / serving.FILE_NAMES[f] for f in formats)]
    log.info("exported %s; all reload in a fresh process and agree on %d images%s", ", ".join(map(str, written)),
             report["verified_images"],
             "".join(f"; {f} max |logit diff| {report[f'max_abs_diff_{f}']:.2g}" for f in formats))
    return report
