r"""Classify image files with the exported model.

    imgclf-predict [--model models/model_state.pt] [--top-k 3] [--json] PATHS...
    python -m imgclf.serve.predict photo.jpg holiday/          # folders are searched recursively

Each image is decoded and resized by :func:`imgclf.data.decode.load_image_file`, the very
code that built the training cache, to the ``image_size`` stored with the model; the model
normalises the uint8 pixels itself. A file that cannot be read or decoded is reported on its
own and the others are still classified. The limits are preprocess's: a file over ``--max-mb``
(64) is refused from its size before it is read, an image over ``--max-megapixels`` (50) from
its header before it is decoded, and a device or FIFO (or a link to one) by its type. Class
names are printed with control characters escaped (a folder named with a newline). Exit status: 0 all classified, 1 some files failed,
2 usage or model errors. A file name that is not valid UTF-8 is shown with its undecodable
bytes as ``\xNN`` (text and JSON alike), so printing it can never fail and lose the results.

The default model file is the state_dict bundle, loaded with ``weights_only=True`` (tensors
and plain data only). ``--model models/serving/model.onnx`` (any ``.onnx`` file the export
stage wrote) runs the ONNX file with onnxruntime instead, no PyTorch model code involved; the
class names and image size come from its metadata. ``--whole-model`` unpickles a
``torch.save(model)`` file instead, which runs code from the file: use it for files you
trust. Such a file holds no class names or image size, so those still come from the bundle
given by ``--model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import paths as project_paths
from ..core.errors import PipelineError
from ..data.decode import IMAGE_SUFFIXES, MAX_BYTES, MAX_PIXELS, ImageFileError, load_image_file
from ..models.bundle import load_state_dict_model, load_whole_model, read_bundle
from .names import display_name
from .serving import OnnxClassifier

BATCH_SIZE = 64  # images per forward pass: bounds memory for folders of large images


def display_path(path: str | os.PathLike) -> str:
    r"""``path`` as text any terminal or JSON parser takes: bytes that are not UTF-8 become
    ``\xNN`` (Python holds them as lone surrogates, which a strict UTF-8 stream refuses)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_images(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, str | None]]:
    """Expand folders (recursively, image suffixes only, hidden files skipped, sorted).

    Returns ``(path, error)`` pairs; the error is set for a folder holding no images.
    Files named explicitly are kept whatever their suffix: decoding decides.
    """
    found: list[tuple[Path, str | None]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            found.append((p, None))
            continue
        images = sorted(
            f
            for f in p.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES
            and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if images:
            found += [(f, None) for f in images]
        else:
            found.append((p, f"folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
    return found


def predict_files(
    model: torch.nn.Module | Callable[[torch.Tensor], Any],
    bundle: dict[str, Any],
    paths: Sequence[str | os.PathLike],
    top_k: int = 3,
    *,
    batch_size: int = BATCH_SIZE,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> list[dict[str, Any]]:
    """Classify ``paths`` (files or folders); one result per image, in order.

    Each result is ``{"path", "top": [{"class", "prob"}, ...]}`` with probabilities from the
    softmax, highest first, or ``{"path", "error"}``. ``bundle`` supplies ``classes`` and
    ``image_size`` (a state_dict bundle from :mod:`imgclf.models.bundle`, or an ONNX file's
    metadata). ``model`` maps uint8 ``(N, 3, H, W)`` to logits: a PyTorch module, or an
    :class:`imgclf.serve.serving.OnnxClassifier`, which runs on the CPU and returns numpy logits.
    A file over ``max_bytes`` or ``max_pixels``, or one that is not a regular file (a device,
    a FIFO), is refused before it is read or decoded; it gets an error and the others their result.
    """
    classes = list(bundle["classes"])
    image_size = int(bundle["image_size"])
    k = max(1, min(top_k, len(classes)))
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    results: list[dict[str, Any]] = []
    batch: list[tuple[dict[str, Any], np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.from_numpy(np.stack([img for _, img in batch])).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            logits = torch.as_tensor(model(x.to(device)))
        if logits.ndim != 2 or logits.shape[1] != len(classes):
            raise PipelineError(
                f"the model gives {tuple(logits.shape[1:])} outputs per image but the bundle "
                f"names {len(classes)} classes"
            )
        probs, idx = logits.float().softmax(dim=1).topk(k, dim=1)
        for (result, _), p_row, i_row in zip(batch, probs.tolist(), idx.tolist()):
            result["top"] = [{"class": classes[i], "prob": p} for p, i in zip(p_row, i_row)]
        batch.clear()

    for path, error in find_images(paths):
        result: dict[str, Any] = {"path": display_path(path)}
        results.append(result)
        if error is not None:
            result["error"] = error
            continue
        try:
            batch.append((result, load_image_file(path, image_size, max_bytes=max_bytes, max_pixels=max_pixels,
                                                  limit_names=("--max-mb", "--max-megapixels"))))
        except ImageFileError as e:
            result["error"] = e.reason
        except MemoryError:  # within the limits, yet more than this machine has: this file only
            result["error"] = "not enough memory to decode it"
        if len(batch) == batch_size:
            flush()
    flush()
    return results


def format_text(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['path']}: error: {result['error']}"
    top = ", ".join(f"{display_name(t['class'])} ({100 * t['prob']:.1f}%)" for t in result["top"])
    return f"{result['path']}: {top}"


def what_model_file(path: Path) -> str:
    """What a file given as ``--model`` is, when it is not a state_dict bundle, and how to load
    it: the export stage's other files (the whole model, the ``.pt2`` program) or not a model."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if any(n.endswith(("/archive_format", "/extra/imgclf.json")) or "/models/" in n for n in names):
        return (f"{path}: a torch.export program (.pt2), for serving: load it with "
                "torch.export.load(path).module(). imgclf-predict takes the state_dict file "
                f"({project_paths.STAGES['export'].bundle}) or the ONNX file as --model")
    if any(n.endswith("/data.pkl") for n in names):
        return (f"{path}: a whole-model file (torch.save(model)): loading it runs code from the file. If you trust it: "
                f"--whole-model {path}, with --model naming the state_dict file exported with it "
                f"({project_paths.STAGES['export'].bundle}, for the class names)")
    return f"{path}: not a model file (neither a PyTorch file, which is a zip archive, nor ONNX)"


def _read_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The state_dict bundle at ``path``; any other file is named for what it is."""
    if path.suffix.lower() == ".pt2" and path.is_file():
        raise PipelineError(what_model_file(path))
    try:
        return load_state_dict_model(path)
    except PipelineError as e:
        if not path.is_file() or "not a loadable state_dict file" not in str(e):
            raise
        raise PipelineError(what_model_file(path)) from None


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module | OnnxClassifier, dict[str, Any]]:
    if args.model.suffix.lower() == ".onnx":
        if args.whole_model is not None:
            raise PipelineError("--whole-model takes its class names from a state_dict --model, not an ONNX file")
        onnx_model = OnnxClassifier(args.model)  # onnxruntime; classes and image size from its metadata
        return onnx_model, onnx_model.metadata
    if args.whole_model is None:
        return _read_model(args.model)
    print(
        f"warning: --whole-model unpickles {args.whole_model}, which can run any code stored in "
        "it; use it only for files you trust (the default state_dict file is safe)",
        file=sys.stderr,
    )
    try:
        bundle = read_bundle(args.model)  # class names and image size; its weights are unused
    except PipelineError as e:
        raise PipelineError(
            f"{e}\n--whole-model files hold no class names or image size; pass the state_dict "
            "file exported with it as --model"
        ) from None
    try:
        model = load_whole_model(args.whole_model)
    except FileNotFoundError:
        raise PipelineError(f"{args.whole_model}: no such model file (run `dvc repro export`)") from None
    except Exception as e:
        raise PipelineError(f"{args.whole_model}: not a loadable whole-model file ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise PipelineError(f"{args.whole_model}: holds a {type(model).__name__}, not a model")
    return model, bundle


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="imgclf-predict",
        description="Classify image files (or folders of them) with the trained model.",
        epilog="Exit status: 0 all classified, 1 some files could not be read or decoded, "
        "2 usage or model errors.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    parser.add_argument(
        "--model", type=Path, default=project_paths.STAGES["export"].bundle,
        help="state_dict bundle written by the export stage (default: %(default)s), or its "
        "ONNX file (models/serving/model.onnx: runs with onnxruntime)",
    )
    parser.add_argument(
        "--whole-model", type=Path, metavar="FILE",
        help="load this torch.save(model) file instead (unpickling runs code: trusted files only); "
        "class names and image size still come from --model",
    )
    parser.add_argument("--top-k", type=_positive, default=3, help="classes shown per image (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--max-mb", type=_positive_float, default=MAX_BYTES / 1e6, metavar="MB",
                        help="refuse, unread, a file larger than this (MB = 10^6 bytes; default: %(default)g, "
                        "as preprocess.max_member_mb)")
    parser.add_argument("--max-megapixels", type=_positive_float, default=MAX_PIXELS / 1e6, metavar="MP",
                        help="refuse, undecoded, an image whose header declares more pixels (default: %(default)g, "
                        "as preprocess.max_megapixels)")
    parser.add_argument("--batch-size", type=_positive, default=BATCH_SIZE, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a class name the terminal cannot show must not lose the rest
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)  # exits with status 2 on a usage error
    try:
        model, bundle = load_model(args)  # both loaders return models in eval mode
        results = predict_files(model, bundle, args.paths, args.top_k, batch_size=args.batch_size,
                                max_bytes=round(args.max_mb * 1e6), max_pixels=round(args.max_megapixels * 1e6))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. weights that do not fit the architecture named in the bundle
        print(f"error: cannot run the model: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(format_text(r), file=sys.stderr if "error" in r else sys.stdout)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
