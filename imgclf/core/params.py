"""The one params schema shared by every stage.

``params.yaml`` is validated as a whole before a stage touches any data: an unknown key (a
typo in ``dvc exp run -S +trian.lr=...`` silently *adds* a key), a wrong type or an
out-of-range value stops the stage with one message naming the key, the value and what is
allowed. Each stage then reads only its own sections, and ``dvc.yaml`` declares exactly
those keys; the ``params`` stage declares the whole file, so a misspelt *section*, which no
other stage declares, still fails the next ``dvc repro``.

Types are strict: ``epochs: true`` is not 1 and ``flip: 'off'`` is not false (pydantic would
coerce both without a word); an int is still a float (``lr: 1``); floats must be finite. The
file is read as DVC reads it (ruamel.yaml, YAML 1.2: ``1e-3`` is a number, ``off`` a string),
so the value a stage uses is the one ``dvc params diff`` and ``dvc exp show`` report, and a
key given twice is an error, as it is to DVC, not the last value silently.

Checks that need the image size, which the preprocess stage decides (``meta.json``), are made
by the stage that knows both: train (``crop_padding``, the architecture's smallest image) and
export (``tta_shift``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import PipelineError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"


class ParamsError(PipelineError):
    pass


class _Section(BaseModel):
    # strict: no true -> 1, 'off' -> False or '3' -> 3; an int is still accepted as a float.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DownloadParams(_Section):
    # http(s):// or file:// URL, or a local path (an archive, or a folder of class folders).
    url: str = OFFICIAL_URL
    # Expected md5 of the fetched archive; "" skips the check (e.g. a folder source).
    md5: str = OFFICIAL_MD5
    timeout: float = Field(30.0, gt=0, le=600)  # seconds per network operation

    @field_validator("md5")
    @classmethod
    def _md5_hex(cls, v: str) -> str:
        v = v.strip().lower()
        if v and (len(v) != 32 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("must be 32 hex digits, or '' to skip the check")
        return v

    @field_validator("url")
    @classmethod
    def _url_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be an http(s):// or file:// URL or a local path")
        return v.strip()


class PreprocessParams(_Section):
    dataset: Literal["cifar10", "imagefolder"] = "cifar10"
    image_size: int = Field(32, ge=8, le=1024)  # pixels, square
    bad_images: Literal["fail", "skip"] = "fail"  # imagefolder: corrupt or non-image files
    workers: int = Field(0, ge=0, le=256)  # image-decoding threads; 0 = one per core
    sample_images: int = Field(64, ge=0, le=1024)  # images in the TensorBoard grid
    # Limits on hostile or broken input, checked before the bytes are read or decoded. Megabytes
    # are 10^6 bytes. A CIFAR-10 batch is 31 MB, a 24-megapixel JPEG photo about 10 MB.
    max_member_mb: float = Field(64, gt=0, le=1_000_000)  # one archive member, uncompressed
    max_total_mb: float = Field(200_000, gt=0, le=100_000_000)  # the whole archive, uncompressed
    # Pixels of one image (width x height, from its header). The upper bound is Pillow's and
    # OpenCV's hard limit here (imgclf.data.decode.BACKSTOP_PIXELS).
    max_megapixels: float = Field(50, gt=0, le=178)


class ModelParams(_Section):
    arch: str = "seed_cnn_bn"  # a file in imgclf/models/archs/ registers it (checked by the train stage)
    pretrained: bool = False  # vgg16 only: ImageNet weights (needs a download)
    width: int = Field(64, ge=8, le=1024)  # resnet_fast, whitened_net: channels of the first block


class AugmentParams(_Section):
    crop_padding: int = Field(4, ge=0, le=64)  # pixels of reflect padding before a random crop; < image size
    # true: mirror a random half each epoch; 'alternate': a fixed random half in even epochs and
    # the other half in odd ones (every image seen both ways every two epochs); false: never.
    flip: bool | Literal["alternate"] = True

    @field_validator("flip", mode="before")
    @classmethod
    def _flip(cls, v: Any) -> Any:
        if v is True or v is False or v == "alternate":
            return v
        raise ValueError("must be true, false or alternate")


class TrainParams(_Section):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = Field(5e-4, ge=0, le=1)  # not on biases and norm parameters
    # Learning rate of the biases and norm parameters, as a multiple of lr (the speed records
    # train batch norm's biases 64x faster than the weights while its scales stay frozen).
    bias_lr_scale: float = Field(1.0, gt=0, le=1000)
    # Lookahead: every 5 steps the weights are pulled back towards an average of their past
    # values, more strongly as training ends; the run ends on the average (imgclf/train/lookahead.py).
    lookahead: bool = False
    schedule: Literal["constant", "cosine", "onecycle", "linear"] = "onecycle"
    warmup_epochs: float = Field(1.0, ge=0, le=10_000)  # cosine/linear only
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Share of each class's training images held out for the per-epoch validation metrics;
    # 0 = train on all of them, and measure no held-out data during training.
    val_fraction: float = Field(0.1, ge=0, le=0.5)
    augment: AugmentParams = AugmentParams()
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str = "auto"  # auto = CUDA, then MPS, then CPU; or cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile; pays off on GPU for long runs
    threads: int = Field(0, ge=0, le=1024)  # CPU threads; 0 = all cores (shared among processes)
    processes: int = Field(1, ge=1, le=1024)  # per node; >1: torchrun, one process per GPU (DDP)
    nodes: int = Field(1, ge=1, le=1024)  # machines; >1: torchrun's c10d rendezvous at rdzv_endpoint
    # "host:port" of the first node (the one `dvc repro` runs on), which hosts the rendezvous;
    # validate_default: nodes > 1 with the default "" must fail too.
    rdzv_endpoint: str = Field("", validate_default=True)
    dist_timeout: int = Field(300, ge=5, le=86_400)  # seconds a rendezvous or a collective waits for a missing peer

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (
            v.startswith("cuda:") and v[5:].isdigit()
        )
        if not ok:
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    # A field validator (not a model validator) so the message names the key and its value
    # like every other params error; `nodes` is declared first, so info.data holds it.
    @field_validator("rdzv_endpoint")
    @classmethod
    def _rdzv_endpoint(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        nodes = info.data.get("nodes", 1)
        if not v:
            if nodes > 1:
                raise ValueError(f"train.nodes = {nodes} needs train.rdzv_endpoint: the host:port of the first "
                                 "node, e.g. node1:29400")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port (the first node's address and a free TCP port), e.g. node1:29400")
        return v


class EvaluateParams(_Section):
    batch_size: int = Field(1000, ge=1, le=65_536)


class ExportParams(_Section):
    check_batch: int = Field(32, ge=1, le=4096)  # images used to prove the exports agree
    onnx: bool = True  # also write models/serving/model.onnx (onnxruntime, TensorRT, ...)
    pt2: bool = True  # also write models/serving/model.pt2 (torch.export)
    # Largest |logit difference| the ONNX and .pt2 files may show against PyTorch: float32
    # reordering gives ~1e-6; a wrong graph gives differences of order 1.
    tolerance: float = Field(1e-3, gt=0, le=1)
    # Test-time augmentation, part of the exported model (imgclf/models/tta.py): evaluate, predict and
    # the serving files all average these views.
    tta_flip: bool = False  # average logits of the image and its mirror
    tta_shift: int = Field(0, ge=0, le=8)  # pixels: also average views shifted by (+s,+s), (-s,-s); 0 = off; < image size


class Params(_Section):
    download: DownloadParams = DownloadParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()


class TrainSections(NamedTuple):
    """The train stage's params: the network and how to train it."""

    model: ModelParams
    train: TrainParams


# The params each stage reads (dvc.yaml declares these sections, and no others; a test checks).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "params": tuple(Params.model_fields),  # the whole file
    "download": ("download",),
    "preprocess": ("preprocess",),
    "train": ("model", "train"),
    "export": ("export",),
    "evaluate": ("evaluate",),
}


def stage_section(params: Params, stage: str) -> Any:
    """What ``run(section, paths)`` of ``stage`` gets: its one section, the train stage's two
    as :class:`TrainSections`, or the whole file for the params stage."""
    names = STAGE_SECTIONS[stage]
    if stage == "params":
        return params
    if stage == "train":
        return TrainSections(params.model, params.train)
    (name,) = names
    return getattr(params, name)


# What a strict type error means in params.yaml's terms.
_EXPECTED = {
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "finite_number": "must be a finite number",
    "model_type": "must be a section (a mapping of keys)",
}


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        model: type[BaseModel] = Params
        for part in parent:
            model = model.model_fields[part].annotation  # type: ignore[assignment]
        allowed = ", ".join(model.model_fields)
        where = ".".join(str(p) for p in parent) or "the top level"
        what = "section" if not parent else "key"
        return f"unknown {what} {key!r} (value {value!r}); the keys of {where} are: {allowed}"
    msg = _EXPECTED.get(err["type"]) or err["msg"].removeprefix("Value error, ")
    return f"{key} = {value!r}: {msg}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        if len(lines) == 1:  # the usual case: one line naming the key, the value and what is allowed
            raise ParamsError(f"{source}: {lines[0]}") from None
        raise ParamsError(f"{source}: {len(lines)} invalid params:\n  " + "\n  ".join(lines)) from None


def read_yaml(path: Path) -> Any:
    """The YAML file at ``path`` as DVC reads it (ruamel.yaml's safe loader, YAML 1.2)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run stages from the project root)") from None
    try:
        return YAML(typ="safe").load(text)
    except DuplicateKeyError as e:
        found = re.search(r'found duplicate key "(.*)" with value', e.problem or "")
        key = found.group(1) if found else "?"
        first = e.context_mark.line + 1 if e.context_mark else "?"
        raise ParamsError(
            f"{path}, line {e.problem_mark.line + 1}: key {key!r} is given twice in the mapping that "
            f"starts at line {first}; delete one (DVC refuses such a file too)"
        ) from None
    except MarkedYAMLError as e:
        where = f", line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ParamsError(f"{path}{where}: not valid YAML: {e.problem or e.context}") from None
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate the whole params file (every stage calls this first)."""
    path = Path(path)
    return parse_params(read_yaml(path), str(path))


def check_whole_file(params: Params, paths: Any = None) -> dict[str, Any]:
    """The params stage: the runner has validated the whole file by now; say so."""
    logging.getLogger(__name__).info("params.yaml is valid")
    return {}
