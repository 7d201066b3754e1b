"""Resumable training state: one file, written atomically after every epoch.

A checkpoint is a plain dict, like nanoGPT's: the model's and the step's state, the epoch,
the per-epoch history, every RNG state, and the ``model`` and ``train`` params themselves,
so the file can be inspected on its own. Everything in it is a tensor or plain data, so it
loads with ``weights_only=True`` (no code runs from the file).

It is resumed only if its fingerprint (the params and the exact bytes of the cache) matches
the run's. A file that does not load (a power cut mid-write on a filesystem that lost the
data, a disk error) is set aside with a warning and training starts fresh: a damaged
checkpoint must never block training.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_path, file_digest, save_torch
from ..core.params import ModelParams, TrainParams

log = logging.getLogger(__name__)


def fingerprint(model_params: ModelParams, train_params: TrainParams, cache_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the params and the exact data."""
    h = hashlib.sha256()
    h.update(model_params.model_dump_json().encode())
    h.update(train_params.model_dump_json().encode())
    for name in sorted(p.name for p in cache_dir.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update(file_digest(cache_dir / name).encode())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG's state, as tensors and plain data (loadable with weights_only=True)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, *, fingerprint: str, epoch: int, history: list[dict[str, float]], model: torch.nn.Module,
         step_state: dict[str, Any], model_params: ModelParams, train_params: TrainParams) -> None:
    with atomic_path(path) as tmp:
        save_torch({
            "fingerprint": fingerprint, "epoch": epoch, "history": history,
            "model": model.state_dict(), "step": step_state, "rng": rng_state(),
            "params": {"model": model_params.model_dump(), "train": train_params.model_dump()},
        }, tmp)


def load(path: Path, fp: str, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists, loads and matches ``fp``; else None.

    A file that cannot be read as a checkpoint is renamed to ``<name>.damaged-<time>`` (kept
    for a post-mortem, out of the way of the next run) with a warning.
    """
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or "fingerprint" not in ckpt:
            raise ValueError("not a training checkpoint (no fingerprint)")
    except Exception as e:  # truncated zip, garbage, a pickle with code in it, an old format
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.replace(aside)
        log.warning("%s does not load (%s: %s); set aside as %s, training starts fresh",
                    path, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", aside.name)
        return None
    if ckpt["fingerprint"] != fp:
        log.info("ignoring %s: it was made with other params or data", path)
        return None
    return ckpt
