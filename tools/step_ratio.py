"""Our training step against the airbench94 port's, side by side: the time ratio at equal compute.

    python tools/step_ratio.py --port ../shared/anchors/airbench94_cpu.py --cache data/processed \\
        --precision fp32 --ours speed --ours nchw:train.channels_last=false --ours compiled:train.compile=true

Both networks are the same (whitened_net width 64 is airbench94's), at batch 1024, so a step is
the same compute (708 MFLOP per image x 1,024, forward and backward) and the ratio of their
times is the ratio of their speeds. Each measurement runs in a fresh process, and the
processes take turns: the port, then each of ours, ``--repeats`` times, so a machine that
slows down for a while slows both. The ratio is the median over the repeats of our time
divided by the port's time of the same repeat.

- **Ours**: the speed recipe (``recipes/speed.yaml``) laid over ``params.yaml``, then the
  ``-S``-style values of that ``--ours NAME:KEY=VALUE,...``, trained as ``train()`` trains it
  (``set_up``, the epoch's augmented batches, ``TrainStep``): ``--warmup`` steps (a compiled
  step compiles in them), then ``--steps`` steps timed.
- **The port**, unchanged: its module is loaded and its ``main()`` run once, for ``--warmup +
  --steps`` steps (its ``EPOCHS`` set to that fraction of an epoch). A global optimiser hook
  (``register_optimizer_step_post_hook``) stamps the end of each of its optimiser steps; its
  step time is the time from the end of step ``--warmup`` to the end of the last, over
  ``--steps``: everything its loop does per step (the batch's gather, forward, backward, the
  optimiser, the schedule, the lookahead), nothing before it. Its evaluation is replaced by a
  no-op (it is not part of the step, and it would cost minutes). In fp32 its autocast is turned
  off, as ``tools/run_fp32.py`` does. (Until 2026-12-05 the port was timed by its own clock as
  the difference of a ``--warmup``-step run and a ``--warmup + --steps``-step one in the same
  process; the two runs' preparation differed by seconds, which showed the port up to 20%
  faster per step than its steps took: docs/speed.md.)
- **Ours** is timed the same way: from the end of step ``--warmup`` to the end of the last.

Neither side counts the once-per-epoch preparation of the augmented images (in both it runs
before the first step of the epoch). ``--precision bf16`` needs bf16 kernels (AVX-512 BF16 or
AMX): elsewhere oneDNN emulates them and both sides run many times slower than in fp32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure_ours(cache: Path, precision: str, batch: int, overrides: list[str], warmup: int, steps: int,
                 on_step=lambda: None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from imgclf import recipes
    from imgclf.train.augment import Augmenter
    from imgclf.train.loop import set_up
    from imgclf.train.trainee import epoch_batches

    params = recipes.resolve("speed", [f"train.precision={precision}", f"train.batch_size={batch}", *overrides],
                             params=ROOT / "params.yaml")
    tp = params.train
    run = set_up(params.model, tp, cache)
    if warmup + steps > run.steps_per_epoch:
        raise SystemExit(f"--warmup + --steps = {warmup + steps} is more than one epoch ({run.steps_per_epoch} steps)")
    x_train, y_train = run.cache.train.images, run.cache.train.labels
    augmenter = Augmenter(x_train, crop_padding=tp.augment.crop_padding, flip=tp.augment.flip, seed=tp.seed)
    step = run.trainee.step
    if tp.compile:
        step.forward = torch.compile(run.trainee.model)
    run.trainee.model.train()
    batches = epoch_batches(augmenter, y_train, batch=run.batch, steps=warmup + steps,
                            generator=torch.Generator().manual_seed(tp.seed), memory_format=run.trainee.memory_format)
    ends = []  # the end of each step (a CPU step is synchronous: its tensors are ready)
    for x, y in batches:
        loss, _ = step(x, y)
        ends.append(time.perf_counter())
        on_step()
    loss.item()
    seconds = ends[-1] - ends[warmup - 1]
    return {"seconds_per_step": seconds / steps, "threads": torch.get_num_threads(),
            "precision": "fp32" if run.amp is None else str(run.amp).removeprefix("torch."),
            "gflop_per_step": run.flops_per_image * run.batch / 1e9}


def measure_port(port: Path, cache: Path, precision: str, batch: int, warmup: int, steps: int,
                 on_step=lambda: None) -> dict:
    import contextlib

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    os.environ["CACHE"] = str(cache)
    if precision == "fp32":
        torch.autocast = lambda *a, **k: contextlib.nullcontext()
    spec = importlib.util.spec_from_file_location("airbench_port", port)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines its functions; its __main__ block does not run
    ends: list[float] = []
    hook = register_optimizer_step_post_hook(lambda *_: (ends.append(time.perf_counter()), on_step()))
    module.print_training_details = lambda variables, is_final_entry: None
    module.evaluate = lambda *args, **kwargs: 0.0
    module.hyp["opt"]["batch_size"] = batch
    per_epoch = len(torch.load(cache / "train.pt", weights_only=True, mmap=True)["labels"]) // batch  # drop_last
    module.hyp["opt"]["train_epochs"] = (warmup + steps - 0.5) / per_epoch  # ceil(per_epoch x epochs) = the steps
    module.main(0)
    hook.remove()
    if len(ends) != warmup + steps:
        raise SystemExit(f"the port took {len(ends)} optimiser steps, not {warmup + steps}")
    return {"seconds_per_step": (ends[-1] - ends[warmup - 1]) / steps, "threads": torch.get_num_threads(),
            "precision": precision, "steps_seen": len(ends)}


def measure(args: argparse.Namespace, which: str, on_step=lambda: None) -> dict:
    if which == "port":
        return measure_port(args.port, args.cache, args.precision, args.batch, args.warmup, args.steps, on_step)
    values = which.partition(":")[2]
    return measure_ours(args.cache, args.precision, args.batch, [v for v in values.split(",") if v], args.warmup,
                        args.steps, on_step)


def child(args: argparse.Namespace) -> None:
    print("RESULT " + json.dumps(measure(args, args.child)), flush=True)


def profile(args: argparse.Namespace) -> None:
    """``--profile``: one side's timed steps under torch.profiler, in this process: where the
    step's time goes, op by op, and the rate its convolutions reach (FLOPs counted on the
    network, which is the same on both sides)."""
    import torch
    from torch.profiler import ProfilerActivity, schedule
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from imgclf.models.archs.whitened_net import whitened_net

    with torch.device("meta"):  # the FLOPs of a step, forward and backward, without computing it
        net, x = whitened_net(), torch.empty(args.batch, 3, 32, 32)
        with FlopCounterMode(display=False) as forward:
            out = net(x)
        with FlopCounterMode(display=False) as backward:
            out.sum().backward()
    # Step k's profile interval runs from the end of step k to the end of step k + 1; the
    # active ones are the timed steps (--warmup + 1 ... --warmup + --steps).
    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU],
                                  schedule=schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1))
    with prof:
        result = measure(args, args.profile, on_step=prof.step)
    events = prof.key_averages()
    per_step = {e.key: e.self_cpu_time_total / 1e6 / args.steps for e in events}
    total = sum(per_step.values())
    print(f"{args.profile.partition(':')[0]}, {args.precision}, batch {args.batch}: {result['seconds_per_step']:.3f} s/step "
          f"(profiled, {args.steps} steps); self CPU time per step {total:.3f} s")
    print(f"{'op':<44} {'s/step':>8} {'share':>7}")
    for key, t in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{key[:44]:<44} {t:>8.3f} {t / total:>7.1%}")
    conv_bwd = sum(t for k, t in per_step.items() if "conv" in k and "backward" in k.lower())
    conv_fwd = sum(t for k, t in per_step.items() if "conv" in k and "backward" not in k.lower())
    f, b = forward.get_total_flops() / 1e9, backward.get_total_flops() / 1e9
    print(f"convolutions: {(conv_fwd + conv_bwd) / total:.0%} of the step; forward {f:.1f} GFLOP in {conv_fwd:.3f} s "
          f"= {f / conv_fwd if conv_fwd else float('nan'):.0f} GFLOP/s, backward {b:.1f} GFLOP in {conv_bwd:.3f} s "
          f"= {b / conv_bwd if conv_bwd else float('nan'):.0f} GFLOP/s")


def spawn(args: argparse.Namespace, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--port", str(args.port), "--cache", str(args.cache),
           "--precision", args.precision, "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{which}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=Path, default=ROOT.parent / "shared/anchors/airbench94_cpu.py")
    ap.add_argument("--cache", type=Path, default=Path("data/processed"), help="folder with train.pt (the pipeline's cache)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--ours", action="append", metavar="NAME[:KEY=VALUE,...]",
                    help="one of our variants: the speed recipe with these values (default: the recipe alone)")
    ap.add_argument("--batch", type=int, default=1024, help="both sides' batch (airbench94's is 1024)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--profile", metavar="port|NAME[:KEY=VALUE,...]",
                    help="instead of timing, profile this one side's timed steps (ours: a variant as --ours names it)")
    ap.add_argument("--top", type=int, default=12, help="with --profile: how many ops to list")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cache = args.cache.resolve()
    args.port = args.port.resolve()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1 (the timing starts at the end of the last warm-up step)")
    if args.child:
        return child(args)
    if args.profile:
        return profile(args)
    variants = args.ours or ["speed"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.precision}; "
          f"{args.warmup} warm-up + {args.steps} timed steps at batch {args.batch}; {args.repeats} repeats, taking turns", flush=True)
    times: dict[str, list[float]] = {"port": [], **{v: [] for v in variants}}
    for r in range(args.repeats):
        for which in ["port", *variants]:
            result = spawn(args, which)
            times[which].append(result["seconds_per_step"])
            print(f"repeat {r + 1}: {which.partition(':')[0]:<24} {result['seconds_per_step']:.3f} s/step ({result['precision']}, "
                  f"{result['threads']} threads)", flush=True)
    port = times["port"]
    print(f"\n{'':<40} {'s/step (median)':>16} {'x the port':>11}")
    print(f"{'airbench94 port':<40} {statistics.median(port):>16.3f} {1.0:>11.2f}")
    summary = {}
    for v in variants:
        ratio = statistics.median([o / p for o, p in zip(times[v], port)])
        summary[v.partition(":")[0]] = {"values": v.partition(":")[2], "seconds_per_step": times[v], "ratio": ratio}
        print(f"{v.partition(':')[0]:<40} {statistics.median(times[v]):>16.3f} {ratio:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps({"precision": args.precision, "batch": args.batch, "port": port, "ours": summary,
                                         "warmup": args.warmup, "steps": args.steps}, indent=1) + "\n")
    if not all(math.isfinite(t) for ts in times.values() for t in ts):
        sys.exit("a measurement is not finite")


if __name__ == "__main__":
    main()
