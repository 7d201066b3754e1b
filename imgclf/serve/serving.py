"""Model files a serving stack loads without our code: ONNX and ``torch.export`` programs.

Both take what :class:`imgclf.models.registry.Classifier` takes, uint8 RGB images ``(N, 3, H, W)`` on
the 0..255 scale, with a dynamic batch size, and return logits ``(N, classes)``: the
normalisation is inside. What a user needs to use them travels in the file:

* ``model.onnx`` (``torch.onnx.export(dynamo=True)``): runs on onnxruntime, TensorRT,
  OpenVINO, Triton... Class names, image size, mean, std and architecture are in the file's
  ``metadata_props`` (strings; lists and dicts as JSON), read back by :func:`read_onnx_metadata`.
* ``model.pt2`` (``torch.export.export`` + ``torch.export.save``): loads with
  ``torch.export.load`` and PyTorch alone, no model classes needed (unlike ``torch.save(model)``).
  The same metadata is the file's extra file ``imgclf.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import PipelineError
from ..core.files import write_file
from ..models.tta import OFF

FORMATS = ("onnx", "pt2")  # export.onnx / export.pt2 switch each on or off
FILE_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2"}
FORMAT = "imgclf-serving"
VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"
PT2_METADATA_FILE = "imgclf.json"
INPUT_DOC = "images: uint8 RGB (N, 3, H, W), 0..255; the model normalises them itself"
# What every serving file carries from the bundle; all of it a user needs to feed the model
# and name its outputs.
_BUNDLE_KEYS = ("arch", "arch_args", "classes", "mean", "std", "image_size")


def metadata(bundle: dict[str, Any]) -> dict[str, Any]:
    """What travels in a serving file, taken from the state_dict bundle."""
    meta = {"format": FORMAT, "version": VERSION, **{k: bundle[k] for k in _BUNDLE_KEYS}}
    meta["tta"] = bundle.get("tta") or OFF  # the views the graph averages inside
    meta["input"] = INPUT_DOC
    return meta


def _dynamic_batch() -> tuple[dict[int, Any]]:
    # min=1: a serving stack sends single images too. torch.export specialises a dimension
    # whose example size is 0 or 1, so the example batch is 2 (see _example).
    return ({0: torch.export.Dim("batch", min=1)},)


def _example(image_size: int) -> torch.Tensor:
    return torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # the exporters colour their messages
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0]}"


def _export_error(what: str, meta: dict[str, Any], e: Exception, skip: str) -> PipelineError:
    """One line: the exporter's own error and, where it wraps another (the ONNX exporter's
    ConversionError says only which of its steps failed), the innermost one, which says why."""
    cause, seen = e, {id(e)}
    while (inner := cause.__cause__ or cause.__context__) is not None and id(inner) not in seen:
        cause = inner
        seen.add(id(cause))
    why = _first_line(e) + ("" if cause is e else f"; caused by {_first_line(cause)}")
    return PipelineError(f"cannot export model.arch={meta['arch']} {what} ({why}); {skip}")


def export_program(model: torch.nn.Module, meta: dict[str, Any]) -> torch.export.ExportedProgram:
    """The model traced by ``torch.export`` with a dynamic batch: the ``.pt2`` file itself,
    and what the ONNX exporter converts (tracing once serves both formats)."""
    try:
        return torch.export.export(model.eval(), (_example(meta["image_size"]),), dynamic_shapes=_dynamic_batch())
    except Exception as e:
        raise _export_error("with torch.export", meta, e,
                            "set export.onnx=false and export.pt2=false to skip the serving files") from None


def write_pt2(program: torch.export.ExportedProgram, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """``torch.export.save``, with ``meta`` as the extra file ``imgclf.json``."""
    write_file(path, lambda f: torch.export.save(program, f, extra_files={PT2_METADATA_FILE: json.dumps(meta)}))


def write_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """``torch.onnx.export(dynamo=True)``: uint8 input ``images``, output ``logits``, dynamic
    batch, weights inside the one file, ``meta`` in its metadata_props."""
    # The exporter's graph passes log each step at INFO, which a stage's log level shows.
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        onnx_program = torch.onnx.export(
            program, (_example(meta["image_size"]),), dynamo=True,
            dynamic_shapes=_dynamic_batch(),  # names the batch dimension "batch" in the graph
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
        )
    except Exception as e:
        raise _export_error("to ONNX", meta, e, "set export.onnx=false to skip this format") from None
    onnx_program.model.metadata_props.update(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    )
    # One file: external data would be a second file named after this (temporary) path.
    # Protobuf caps a single file at 2 GB; our largest model, vgg16, is 0.54 GB.
    onnx_program.save(path, external_data=False)


def write(model: torch.nn.Module, folder: str | os.PathLike, formats: Sequence[str],
          meta: dict[str, Any]) -> dict[str, Path]:
    """Write one file per format in ``formats`` into ``folder``; returns format -> path."""
    files = {fmt: Path(folder) / FILE_NAMES[fmt] for fmt in formats}
    if files:
        program = export_program(model, meta)
        for fmt, path in files.items():
            (write_pt2 if fmt == "pt2" else write_onnx)(program, path, meta)
    return files


def _check_metadata(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("format", *_BUNDLE_KEYS) if k not in meta]
    if missing or meta["format"] != FORMAT:
        raise PipelineError(
            f"{path}: no {FORMAT} metadata (missing: {', '.join(missing) or 'format'}); "
            "write it with the export stage (`dvc repro export`)"
        )
    if int(meta.get("version", 0)) != VERSION:
        raise PipelineError(f"{path}: metadata version {meta.get('version')} is not supported (expected {VERSION})")
    return meta


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # plain strings (arch, input) are stored as they are


def onnx_session(path: str | os.PathLike, *, threads: int = 0) -> Any:
    """An onnxruntime session on the CPU; ``threads`` 0 lets onnxruntime choose."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file (run `dvc repro export` with export.onnx=true)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1 if threads else 0
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise PipelineError(f"{path}: not a loadable ONNX file ({type(e).__name__}: {e})") from None


def read_onnx_metadata(path: str | os.PathLike, session: Any = None) -> dict[str, Any]:
    """The metadata_props of an exported ONNX file, decoded (classes, image_size, mean, ...)."""
    session = session or onnx_session(path)
    props = session.get_modelmeta().custom_metadata_map
    return _check_metadata(Path(path), {k: _decode(v) for k, v in props.items()})


class OnnxClassifier:
    """Runs an exported ONNX file with onnxruntime: uint8 ``(N, 3, H, W)`` in, logits out.

    No PyTorch model code is involved; ``metadata`` holds the class names and image size.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0):
        self.session = onnx_session(path, threads=threads)
        self.metadata = read_onnx_metadata(path, self.session)

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = images.numpy(force=True) if isinstance(images, torch.Tensor) else np.asarray(images)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.uint8)})[0]


def load_pt2(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a ``.pt2`` program; returns ``(module, metadata)``."""
    path = Path(path)
    extra = {PT2_METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such model file (run `dvc repro export` with export.pt2=true)") from None
    except Exception as e:
        raise PipelineError(f"{path}: not a loadable torch.export file ({type(e).__name__}: {e})") from None
    meta = json.loads(extra[PT2_METADATA_FILE]) if extra[PT2_METADATA_FILE] else {}
    return program.module(), _check_metadata(path, meta)


def logits(fmt: str, path: str | os.PathLike, images: torch.Tensor) -> torch.Tensor:
    """The logits the ``fmt`` file at ``path`` gives on ``images`` (one thread, CPU)."""
    if fmt == "onnx":
        return torch.from_numpy(OnnxClassifier(path, threads=1)(images))
    module, _ = load_pt2(path)
    with torch.no_grad():
        return module(images)
