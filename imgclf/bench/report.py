"""The results as the Markdown docs/speed.md quotes: the run and machine, one table per recipe,
the one-off costs."""

from __future__ import annotations

from typing import Any

from .feeders import RECIPES


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _describe(r: dict[str, Any]) -> str:
    layout = "channels_last" if r["channels_last"] else "NCHW"
    what = {"pipeline": "pipeline", "compute": "compute only", "classic": f"classic DataLoader, {r['workers']} workers"}[r["kind"]]
    threads = f", {_plural(r['threads'], 'thread')}" if r["kind"] == "pipeline" else ""
    return f"{what}: {r['precision']}, {layout}, batch {r['batch']}{threads}"


def _notes(r: dict[str, Any], results: dict[str, Any]) -> str:
    notes = []
    if r["id"] == r["reference"]:
        notes.append("the recipe as `dvc repro` trains it")
    if "overhead" in r:
        noise = "" if abs(r["overhead"]) > r["overhead_noise"] else ", within the repeats' spread"
        notes.append(f"data-path overhead {100 * r['overhead']:.1f}% (1 - pipeline/compute only{noise})")
    if r["kind"] == "compute":
        notes.append("ceiling: one fixed batch on the device")
    if "pipeline_over_classic" in r:
        notes.append(f"pipeline/classic = {r['pipeline_over_classic']:.2f}x")
    for q in results.get("ratios", []):
        if q["a"] == "train_epoch" and q["b"] == r["id"]:
            notes.append(f"train() itself: {q['a_value']:.0f} img/s over a whole epoch ({q['value']:.2f}x)")
        if q["name"].endswith("/ 1 thread") and q["b"] == r["id"]:
            notes.append(f"{q['name']}: {q['value']:.2f}x")
    notes.append(f"repeats ±{50 * r['spread']:.0f}%")
    return "; ".join(notes)


def _header(results: dict[str, Any]) -> list[str]:
    """The run, the machine, the data and the peaks, one bullet each."""
    m, d = results["machine"], results["data"]
    isa = " ".join(m["cpu_matrix_isa"]) or "no AVX"
    lines = [
        f"- Run: {results['started']}, `{results['command']}`.",
        f"- Machine: {m['cpu']} ({isa}), {m['cores_usable']} usable cores of {m['cores']}; torch {m['torch']}, "
        f"{_plural(m['torch_threads'], 'thread')}, CPU capability {m['cpu_capability']}, bf16 kernels {'yes' if m['cpu_bf16'] else 'no'}; "
        f"device {m['device']}" + (f" ({m['cuda_device']})" if m["cuda_device"] else "")
        + (f", TF32 matmul {m['cuda_tf32']['matmul']}, TF32 cuDNN {m['cuda_tf32']['cudnn']}" if m["cuda_tf32"] else "") + ".",
    ]
    if m["busy_elsewhere"] is not None:
        start, end = m["busy_elsewhere"], m["busy_elsewhere_end"]
        lines.append(f"- Other processes kept {100 * start:.0f}% of the CPUs busy at the start, {100 * end:.0f}% at the end"
                     + (" (load average " + ", ".join(f"{v:.2f}" for v in m["load_average"]) + ")" if m["load_average"] else "")
                     + (": **the machine was shared; the figures are low.**" if max(start, end) > 0.1 else "."))
    source = "a synthetic archive in a temporary folder" if d["synthetic"] else d["archive"]
    lines.append(f"- Data: {source}, {d['num_train']} train and {d['num_test']} test images." + (f" **{d['note']}**" if d["note"] else ""))
    if results["quick"]:
        lines.append("- **--quick: small batches, single-step repeats: the figures test the machinery, not the machine.**")
    peaks = ", ".join(f"{p['precision']} {p['flops_per_s'] / 1e9:.0f} GFLOP/s with {_plural(p['threads'] or m['torch_threads'], 'thread')}"
                      for p in results["peak"])
    lines += [f"- Peak ({results['peak'][0]['matmul']}² matmul, median of {results['settings']['repeats']}): {peaks}.", ""]
    return lines


def _throughput(results: dict[str, Any]) -> list[str]:
    """One table per recipe, its rows in the order they were measured."""
    lines = []
    for recipe in RECIPES:
        rows = [r for r in results["throughput"] if r["recipe"] == recipe.name]
        fpi = results["flops_per_image"][recipe.name]
        lines += [
            f"**{recipe.title}** ({'the fast recipe' if recipe.name == 'fast' else 'the tutorial network'}), "
            f"{fpi / 1e6:.0f} MFLOP per training image (forward + backward):",
            "",
            "| measurement | images/s | ratio | % of peak | notes |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            lines.append(f"| {_describe(r)} | {r['images_per_s']:.0f} | {r['ratio']:.2f} | "
                         f"{100 * r['peak_fraction']:.1f}% {r['precision']} | {_notes(r, results)} |")
        lines += ["", "ratio: images/s ÷ the first row's. % of peak: images/s × FLOPs per image ÷ the matmul peak "
                  "of that precision and thread count.", ""]
    return lines


def _one_off(results: dict[str, Any]) -> list[str]:
    p, ep, dn = results["preprocess"], results["train_epoch"], results["dvc_noop"]
    lines = ["**One-off costs:**", "", "| measurement | seconds | notes |", "| --- | ---: | --- |",
             f"| preprocess the whole archive | {p['seconds']:.2f} | cache {p['cache_bytes'] / 1e6:.1f} MB |",
             f"| load the cache (timed_load) | {p['load_seconds']:.3f} | {p['cache_bytes'] / 1e6 / p['load_seconds']:.0f} MB/s; "
             "the file was just written, so from the page cache |"]
    if "seconds" in dn:
        lines.append(f"| no-op `dvc repro` | {dn['seconds']:.2f} | median of 3 in {dn['project']} "
                     f"({', '.join(f'{t:.2f}' for t in dn['runs'])}) |")
    else:
        lines.append(f"| no-op `dvc repro` | – | skipped: {dn['skipped']} |")
    sustained = f"{ep['tflop_per_s'] * 1e3:.0f} GFLOP/s sustained" + (
        f" = {100 * ep['peak_fraction']:.1f}% of the {ep['peak_precision']} peak" if ep["peak_fraction"] else "")
    lines.append(f"| one epoch of train() | {ep['seconds']:.1f} | {ep['images_per_s']:.0f} img/s, {ep['train_images']} images "
                 f"({ep['val_images']} held out), batch {ep['batch']}, {RECIPES[-1].title}, with its validation pass; "
                 f"{ep['wall_seconds']:.1f} s with model build and export; {ep['pflop']:.3g} PFLOP, {sustained} |")
    if results["denormal"]:
        dn = results["denormal"]
        lines.append(f"| {dn['matmul']}² matmul with denormal products, flush-to-zero off / on | "
                     f"{dn['flush_off']:.4f} / {dn['flush_on']:.4f} | {dn['slowdown']:.1f}x slower unflushed "
                     "(configure_threads turns flushing on) |")
    return lines


def format_report(results: dict[str, Any]) -> str:
    lines = _header(results) + _throughput(results) + _one_off(results)
    lines += ["", f"Bench wall time {results['total_seconds']:.0f} s."]
    return "\n".join(lines)
