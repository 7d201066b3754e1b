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
    url: str = Field(OFFICIAL_URL, description="http(s)://, file:// or a local path: an archive, or a folder of class folders")
    md5: str = Field(OFFICIAL_MD5, description="of the fetched archive; '' skips the check (a folder source)")
    timeout: float = Field(30.0, gt=0, le=600, description="seconds per network operation")

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
    dataset: Literal["cifar10", "imagefolder"] = Field(
        "cifar10", description="cifar10: the official python archive; imagefolder: train/ and test/ (or val/) class folders")
    image_size: int = Field(32, ge=8, le=1024, description="pixels (square) every image is resized to")
    bad_images: Literal["fail", "skip"] = Field("fail", description="imagefolder: fail on, or skip, corrupt or non-image files")
    workers: int = Field(0, ge=0, le=256, description="decoding threads; 0 = one per core")
    sample_images: int = Field(64, ge=0, le=1024, description="images in the TensorBoard grid")
    # Limits on hostile or broken input, checked before the bytes are read or decoded. Megabytes
    # are 10^6 bytes. The upper bound of max_megapixels is Pillow's and OpenCV's hard limit here
    # (imgclf.data.decode.BACKSTOP_PIXELS).
    max_member_mb: float = Field(64, gt=0, le=1_000_000,
                                 description="MB (10^6 bytes) per archive member, uncompressed (a CIFAR-10 batch is 31)")
    max_total_mb: float = Field(200_000, gt=0, le=100_000_000, description="MB, all members of the archive together, uncompressed")
    # Members of any kind (files, folders, links), counted from the headers: each costs some
    # bookkeeping even when empty. ImageNet's training set has 1.28 million.
    max_members: int = Field(2_000_000, ge=1, le=100_000_000,
                             description="members of the archive, of any kind (files, folders, links), counted from the headers")
    max_megapixels: float = Field(50, gt=0, le=178, description="width x height of one image, millions, read from its header")


class ModelParams(_Section):
    arch: str = Field("seed_cnn_bn", description="an architecture of imgclf/models/archs/ (docs/params.md lists them)")
    pretrained: bool = Field(False, description="vgg16: start from ImageNet weights (needs a download)")
    width: int = Field(64, ge=8, le=1024, description="resnet_fast, whitened_net: the network's channels (docs/params.md)")


class AugmentParams(_Section):
    crop_padding: int = Field(4, ge=0, le=64, description="pixels of reflect padding before a random crop; 0 = off; < image_size")
    # 'alternate': a fixed random half in even epochs and the other half in odd ones, so every
    # image is seen both ways every two epochs.
    flip: bool | Literal["alternate"] = Field(
        True, description="true: mirror a random half each epoch | alternate: a fixed half, then the other | false")

    @field_validator("flip", mode="before")
    @classmethod
    def _flip(cls, v: Any) -> Any:
        if v is True or v is False or v == "alternate":
            return v
        raise ValueError("must be true, false or alternate")


class TrainParams(_Section):
    epochs: int = Field(10, ge=1, le=10_000, description="passes over the training images")
    batch_size: int = Field(128, ge=1, le=65_536, description="images per step, over all processes")
    optimizer: Literal["sgd", "adam", "adamw", "muon"] = Field(
        "sgd", description="sgd (with momentum) | adam | adamw | muon (conv filters; the rest sgd)")
    lr: float = Field(0.05, gt=0, le=100, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd")
    nesterov: bool = Field(True, description="sgd: Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="not applied to biases and norm parameters (see decay_biases)")
    # airbench94 decays them too, by the same share per step as the weights.
    decay_biases: bool = Field(False, description=(
        "also decay biases and norm parameters, by weight_decay / bias_lr_scale (the weights' share per step)"))
    # torch.optim.Muon (imgclf/train/muon.py): each conv filter bank, flattened to 2-D, gets an
    # orthogonalised momentum update; the head, biases and norm parameters keep Nesterov SGD.
    muon_lr: float = Field(0.05, gt=0, le=100, description="muon: peak learning rate of the conv filters")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: momentum of the conv filters")
    muon_ns_steps: int = Field(5, ge=1, le=20, description="muon: Newton-Schulz iterations per update")
    muon_weight_decay: float = Field(0.0, ge=0, le=1, description=(
        "muon: decoupled weight decay of the conv filters, per unit of learning rate"))
    muon_normalize: bool = Field(False, description=(
        "muon: rescale each filter bank to norm sqrt(out channels) before each step (airbench94_muon)"))
    # The speed records train batch norm's biases 64x faster than the weights while its
    # scales stay frozen.
    bias_lr_scale: float = Field(1.0, gt=0, le=1000,
                                 description="learning rate of biases and norm parameters, as a multiple of lr")
    # airbench94 trains its whitening layer's bias for 3 epochs, then freezes it.
    whiten_bias_epochs: int = Field(0, ge=0, le=10_000, description=(
        "whitened_net: epochs the whitening layer's bias trains before it is frozen; 0 = the whole run"))
    whiten_bias_lr: Literal["bias", "weights"] = Field("bias", description=(
        "whitened_net: the whitening layer's bias learns at the biases' rate (bias_lr_scale x lr) or the weights'"))
    # More strongly as training ends (imgclf/train/lookahead.py).
    lookahead: bool = Field(False, description="every 5 steps pull the weights back to their running average; end on it")
    schedule: Literal["constant", "cosine", "onecycle", "linear"] = Field(
        "onecycle", description="the learning rate over the run: constant | cosine | onecycle | linear")
    warmup_epochs: float = Field(1.0, ge=0, le=10_000, description="cosine, linear: epochs of linear warm-up")
    # airbench94's one-cycle: 0.2 -> 1 at 23% of the steps -> 0.07 (recipes/airbench94.yaml).
    onecycle_start: float = Field(0.0, ge=0, le=1, description="onecycle: the lr at the first step, as a share of the peak")
    onecycle_peak: float = Field(0.25, gt=0, lt=1, description="onecycle: where the peak falls, as a share of the steps")
    onecycle_end: float = Field(0.0, ge=0, le=1, description="onecycle: the lr at the last step, as a share of the peak")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="share of each target spread over all classes")
    # The same images every run; with 0, evaluate's test figures are the run's only held-out ones.
    val_fraction: float = Field(0.1, ge=0, le=0.5, description=(
        "share of each class's training images held out for the val_ metrics; 0 = train on all (a final run)"))
    augment: AugmentParams = Field(AugmentParams(), description="training-time augmentation")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="initial weights, augmentation and batch order")
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto (bf16 where the hardware has it) | fp32 | bf16 | fp16")
    channels_last: bool = Field(True, description="NHWC memory format for the convolutions")
    compile: bool = Field(False, description="torch.compile the model (pays off on a GPU, for long runs)")
    keep_memory: bool = Field(False, description=(
        "CPU, glibc: keep freed memory for reuse, so a step does not fault in fresh pages for its activations "
        "(docs/speed.md); the process keeps its peak memory"))
    threads: int = Field(0, ge=0, le=1024, description="CPU threads; 0 = all cores available (shared among a node's processes)")
    processes: int = Field(1, ge=1, le=1024, description="training processes per node, one per GPU; >1: torchrun + DDP")
    nodes: int = Field(1, ge=1, le=1024,
                       description="machines; >1: the others run `python stages/train.py --join` (docs/distributed.md)")
    # validate_default: nodes > 1 with the default "" must fail too.
    rdzv_endpoint: str = Field("", validate_default=True,
                               description="host:port of the first node (where dvc repro runs); needed when nodes > 1")
    dist_timeout: int = Field(300, ge=5, le=86_400, description="seconds a rendezvous or a collective waits for a missing peer")

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
    batch_size: int = Field(1000, ge=1, le=65_536, description="test images per forward pass")


class ExportParams(_Section):
    check_batch: int = Field(32, ge=1, le=4096, description="test images the reloaded exports must agree on")
    onnx: bool = Field(True, description="also write models/serving/model.onnx (onnxruntime, TensorRT, OpenVINO, Triton)")
    pt2: bool = Field(True, description="also write models/serving/model.pt2 (torch.export.load)")
    # float32 reordering gives ~1e-6; a wrong graph gives differences of order 1.
    tolerance: float = Field(1e-3, gt=0, le=1,
                             description="largest |logit difference| allowed between PyTorch and the ONNX/.pt2 files")
    # Test-time augmentation, part of the exported model (imgclf/models/tta.py): evaluate, predict and
    # the serving files all average these views.
    tta_flip: bool = Field(False, description="test-time augmentation: average the logits of each image and its mirror")
    tta_shift: int = Field(0, ge=0, le=8, description="pixels; >0 also averages views shifted by (+s,+s) and (-s,-s); < image_size")
    # airbench94 weighs the unshifted pair as much as both shifted pairs together: 2.
    tta_center_weight: float = Field(1.0, gt=0, le=100, description=(
        "tta_shift > 0: the weight of the unshifted views against each shifted pair's"))


class Params(_Section):
    download: DownloadParams = Field(DownloadParams(), description="where the dataset comes from (the download stage)")
    preprocess: PreprocessParams = Field(PreprocessParams(), description="decoding into the tensor cache")
    model: ModelParams = Field(ModelParams(), description="the network (read by train; exports carry it)")
    train: TrainParams = Field(TrainParams(), description="how the network is trained")
    evaluate: EvaluateParams = Field(
        EvaluateParams(), description="the exported model (models/model_state.pt), with its test-time augmentation")
    export: ExportParams = Field(ExportParams(), description="the model files and the proof that they agree")


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
