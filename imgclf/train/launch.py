"""How the train stage starts its processes: torchrun, on one node or several.

``train.nodes`` x ``train.processes`` > 1 makes the stage restart itself under torchrun:

* one node: ``torchrun --standalone --nproc-per-node P``;
* several: torchrun's c10d rendezvous. The first node is the one ``dvc repro`` (or
  ``dvc exp run``) runs on; its agent hosts the rendezvous at ``train.rdzv_endpoint``. Every
  other node runs ``python stages/train.py --join`` in a clone at the same commit, with the
  same ``data/processed`` (``dvc pull``). The rendezvous id is a hash of the model and train
  params, so only nodes with the same params meet.

Workers learn which node is the first from ``IMGCLF_FIRST_NODE`` (see
``distributed._first_node_first``): its local rank 0 becomes global rank 0, which alone
writes the outputs and the checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import PipelineError
from ..core.params import ModelParams, Params, TrainParams, TrainSections, load_params, parse_params, read_yaml
from ..core.paths import PARAMS, TrainPaths

log = logging.getLogger(__name__)

# Set for the workers: 1 on the first node (the one `dvc repro` runs), 0 on the nodes that
# joined with `python stages/train.py --join`.
FIRST_NODE_ENV = "IMGCLF_FIRST_NODE"
# A file the workers create once they are in the process group: a rendezvous failing after
# that (the first node, which hosts it, is gone) is something they have already reported.
STARTED_ENV = "IMGCLF_WORKERS_STARTED"


def parse_stage_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python stages/train.py",
        description="The train stage (dvc repro runs it). On the other nodes of a multi-node run: --join.",
    )
    parser.add_argument("--join", action="store_true",
                        help="join the multi-node run that `dvc repro` started on the first node")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="with --join: a params.yaml value, as the first node's `dvc exp run -S` set it")
    return parser.parse_args(argv)


def read_params(path: Path, args: argparse.Namespace) -> Params:
    """params.yaml, with a joining node's ``-S`` values applied (validated as a whole)."""
    params = load_params(path)
    if args.set and not args.join:
        raise PipelineError("-S is for `--join` only; on the first node use `dvc exp run -S ...`")
    if args.set:
        from ruamel.yaml import YAML

        yaml = YAML(typ="safe")  # as DVC reads params.yaml and -S values (YAML 1.2)
        raw: dict[str, Any] = read_yaml(path) or {}
        for item in args.set:
            key, sep, value = item.partition("=")
            parts = key.strip().split(".")
            if not sep or not all(parts):
                raise PipelineError(f"-S {item!r}: expected SECTION.KEY=VALUE, e.g. -S train.nodes=2")
            section = raw
            for part in parts[:-1]:
                section = section.setdefault(part, {})
                if not isinstance(section, dict):
                    raise PipelineError(f"-S {item!r}: {part} is not a section")
            section[parts[-1]] = yaml.load(value)
        params = parse_params(raw, f"{path} with -S {' -S '.join(args.set)}")
    if args.join and params.train.nodes == 1:
        raise PipelineError("--join joins a run of several nodes, but train.nodes = 1 "
                            "(set it, and train.rdzv_endpoint, as on the first node)")
    return params


def needs_torchrun(train_params: TrainParams) -> bool:
    """Whether this process must start torchrun (rather than train): several processes
    asked for, and not already a torchrun worker."""
    return train_params.nodes * train_params.processes > 1 and "LOCAL_RANK" not in os.environ


def rendezvous_id(model_params: ModelParams, train_params: TrainParams) -> str:
    """Short hash of the model and train params: nodes meet only if their params agree."""
    h = hashlib.sha256((model_params.model_dump_json() + train_params.model_dump_json()).encode())
    return f"imgclf-{h.hexdigest()[:12]}"


def torchrun_args(model_params: ModelParams, train_params: TrainParams, *, join: bool) -> list[str]:
    """torchrun's options (the script and its arguments follow them)."""
    if train_params.nodes == 1:
        return ["--standalone", f"--nproc-per-node={train_params.processes}"]
    timeout = train_params.dist_timeout
    conf = f"is_host={'false' if join else 'true'},join_timeout={timeout},read_timeout={timeout}"
    return [
        f"--nnodes={train_params.nodes}", f"--nproc-per-node={train_params.processes}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={train_params.rdzv_endpoint}",
        f"--rdzv-id={rendezvous_id(model_params, train_params)}", f"--rdzv-conf={conf}",
        "--max-restarts=0",  # a lost node fails the run; the next run resumes from the checkpoint
    ]


def oversubscribed(train_params: TrainParams) -> str | None:
    """A warning when this node would start more processes than it has devices for: GPUs on
    a CUDA device, cores on the CPU (each process then gets a share of a core)."""
    import torch

    from ..models.runtime import resolve_device

    try:
        device = resolve_device(train_params.device)
    except PipelineError:  # no such device: each worker says so itself
        return None
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "GPUs"
    elif device.type == "cpu":
        have, what = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, "CPU cores"
    else:
        return None
    if train_params.processes <= have:
        return None
    return (f"train.processes = {train_params.processes} on a node with {have} {what} ({device.type}): the processes "
            f"share them, which is slower than {have} process{'es' if have > 1 else ''}; set train.processes to at most {have}")


def launch(model_params: ModelParams, train_params: TrainParams, script: str, script_args: list[str], *,
           join: bool) -> None:
    """Run ``script`` under torchrun as this node's ``train.processes`` workers; returns when
    they are done, or raises with one line saying why not."""
    # c10d's C++ side logs a store it cannot reach with a stack trace, and the exception below
    # says it in one line. The level is read once, when torch loads (this module does not
    # import torch before this point); the workers, started later, log as usual.
    quieted = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quieted:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    from torch.distributed.run import main as torchrun

    if quieted:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    args = torchrun_args(model_params, train_params, join=join) + [script, *script_args]
    warning = oversubscribed(train_params)
    if warning:
        log.warning("%s", warning)
    if train_params.nodes == 1:
        log.info("starting %d training processes with torchrun", train_params.processes)
    else:
        log.info("%s the %d-node rendezvous %s at %s with %d training process%s; waiting up to %d s for "
                 "the other nodes (`python stages/train.py --join` there)",
                 "joining" if join else "hosting", train_params.nodes, rendezvous_id(model_params, train_params),
                 train_params.rdzv_endpoint,
                 train_params.processes, "es" if train_params.processes > 1 else "", train_params.dist_timeout)
    os.environ[FIRST_NODE_ENV] = "0" if join else "1"  # the workers inherit it
    # torchrun's agent logs each step of its work, and a failed worker as a report; the
    # worker prints its own one-line error, and the exceptions below are turned into one.
    # (Each of its modules sets its logger's own level, so the parents' level is not enough.)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    where = f"train.rdzv_endpoint = {train_params.rdzv_endpoint}"
    with tempfile.TemporaryDirectory(prefix="imgclf-launch-") as tmp:
        started = Path(tmp) / "started"
        os.environ[STARTED_ENV] = str(started)
        _run(torchrun, args, model_params, train_params, join=join, where=where, started=started)


def _run(torchrun, args: list[str], model_params: ModelParams, train_params: TrainParams, *, join: bool, where: str,
         started: Path) -> None:
    """torchrun's main, its failures turned into one line (or none where a worker printed one)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (RendezvousConnectionError, RendezvousError,
                                                          RendezvousTimeoutError)

    try:
        torchrun(args)
    except ChildFailedError as e:
        killed = [f for f in e.failures.values() if f.exitcode < 0]
        if killed:
            raise PipelineError(
                f"training process {killed[0].local_rank} of this node (pid {killed[0].pid}) was killed by "
                f"{killed[0].signal_name()} (out of memory?); rerun to resume from the last checkpoint"
            ) from None
        raise SystemExit(max(f.exitcode for f in e.failures.values()))  # the worker printed why
    except SignalException:  # SIGINT/SIGTERM: torchrun passed it to the workers, which said so
        raise SystemExit(130) from None
    except RendezvousTimeoutError:
        raise PipelineError(
            f"the {train_params.nodes} nodes did not all join the rendezvous {rendezvous_id(model_params, train_params)} at "
            f"{train_params.rdzv_endpoint} within train.dist_timeout = {train_params.dist_timeout} s. Start `python stages/train.py "
            "--join` on the other nodes, at the same commit and with the same model and train params (the id "
            "is their hash; the log line above shows it on each node)"
        ) from None
    except RendezvousError as e:
        if started.exists():  # the first node went away mid-run: the workers have said so
            raise SystemExit(1) from None
        cause = (f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else str(e)).splitlines()[0].rstrip(".")
        if not isinstance(e, RendezvousConnectionError):
            raise PipelineError(f"the rendezvous at {where} failed: {type(e).__name__}: {cause}") from None
        if join:
            raise PipelineError(f"cannot reach the first node at {where} ({cause}); is "
                                "`dvc repro` running there, and is that its address?") from None
        raise PipelineError(f"cannot host the rendezvous at {where} ({cause}); is the port "
                            "free, and is the host this machine?") from None


def read_section(name: str = "train") -> TrainSections:
    """The train stage's params: params.yaml, with a joining node's ``-S`` values applied."""
    params = read_params(PARAMS, parse_stage_args(sys.argv[1:]))
    return TrainSections(params.model, params.train)


def run(sections: TrainSections, paths: TrainPaths) -> dict[str, Any]:
    """The train stage: train here, or, for several processes or nodes, restart this script
    under torchrun (``--join``: as one of the other nodes)."""
    args = parse_stage_args(sys.argv[1:])
    if needs_torchrun(sections.train):
        launch(sections.model, sections.train, sys.argv[0], sys.argv[1:], join=args.join)
        return {}  # rank 0 wrote the metrics
    from .loop import train  # here: the launching process never trains (saves ~2 s)

    return train(sections.model, sections.train, paths)
