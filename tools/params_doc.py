"""Each param is described once, in the schema (imgclf/core/params.py, `Field(description=...)`);
this writes what is generated from it:

- params.yaml: every key with its value as the file has it (a key it lacks, at its default: `dvc
  exp run -S` can set only keys the file holds) and its description as the comment;
- docs/params.md: the reference: every key, its default, what it takes, its description, and
  the architectures `model.arch` can name, with what each model param means for each.

    python tools/params_doc.py           # rewrite both
    python tools/params_doc.py --check   # exit 1, naming the stale file, if either differs (a test runs this)
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel

from imgclf.core.params import Params, read_yaml
from imgclf.models.registry import ARCHS

ROOT = Path(__file__).resolve().parents[1]
COLUMN = 28  # where params.yaml's comments start
HEADER = """\
# Generated comments: each key's is its description in the schema (imgclf/core/params.py);
# edit it there and run `python tools/params_doc.py` (the values here are yours to edit).
# One section per stage (model: is train's too); dvc.yaml declares each section whole, so a
# stray key reruns its stage, which then fails naming it; the params stage declares the whole
# file, so a misspelt section fails too. Types are strict (true is not 1, 'off' is not false).
# All keys, defaults and ranges: docs/params.md.
"""


def _scalar(value: Any) -> str:
    """``value`` as YAML writes it, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    if isinstance(value, str):
        return yaml.safe_dump(value, width=1 << 20).strip().removesuffix("...").strip()
    return str(value)


def _section(model: type[BaseModel], values: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        if name not in values:  # DVC's -S sets only keys the file holds: a new param enters at its default
            values = {**values, name: field.default.model_dump() if isinstance(field.default, BaseModel) else field.default}
        sub = _submodel(field.annotation)
        if sub is not None:
            lines.append(_with_comment(f"{indent}{name}:", field.description))
            lines += _section(sub, values[name] or {}, indent + "  ")
        else:
            lines.append(_with_comment(f"{indent}{name}: {_scalar(values[name])}", field.description))
    unknown = set(values) - set(model.model_fields)
    if unknown:
        raise SystemExit(f"params.yaml: unknown keys {sorted(unknown)}: fix the file first (the stages refuse it)")
    return lines


def _with_comment(text: str, description: str | None) -> str:
    if not description:
        return text
    return f"{text.ljust(COLUMN - 1)} # {description}" if len(text) < COLUMN - 1 else f"{text}   # {description}"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def render_params_yaml(path: Path) -> str:
    values = read_yaml(path) or {}
    lines = HEADER.splitlines()
    for name, field in Params.model_fields.items():
        if name not in values:
            continue
        lines.append("")
        lines.append(_with_comment(f"{name}:", field.description))
        lines += _section(field.annotation, values[name] or {}, "  ")
    return "\n".join(lines) + "\n"


def _takes(field: Any) -> str:
    annotation = field.annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args:  # bool | Literal[...]
        return " \\| ".join(_takes(type("F", (), {"annotation": a, "metadata": []})) for a in args)
    kind = {bool: "`true` \\| `false`", int: "whole number", float: "number", str: "text"}.get(annotation, str(annotation))
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {getattr(m, attr)}")
    return kind + (f", {' and '.join(bounds)}" if bounds else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            rows += _rows(sub, f"{prefix}{name}.")
            continue
        default = field.default
        rows.append(f"| `{prefix}{name}` | `{_scalar(default)}` | {_takes(field)} | {_cell(field.description or '')} |")
    return rows


def render_docs() -> str:
    out = ["# Parameters", "",
           "Generated by `python tools/params_doc.py` from the schema (`imgclf/core/params.py`), where each",
           "param is described once; `params.yaml`'s comments are generated from the same place. Back to the",
           "[README](../README.md).", ""]
    for name, field in Params.model_fields.items():
        out += [f"## `{name}`: {field.description}", "", "| key | default | takes | what it is |", "| --- | --- | --- | --- |"]
        out += _rows(field.annotation, f"{name}.")
        out.append("")
    out += ["## Architectures (`model.arch`)", "",
            "One file each in `imgclf/models/archs/` ([design.md](design.md#an-architecture-is-one-file)).", "",
            "| `model.arch` | what it is | model params it takes |", "| --- | --- | --- |"]
    for name, arch in sorted(ARCHS.items()):
        doc = " ".join((arch.build.__doc__ or "").split("\n\n")[0].split())
        takes = "; ".join(f"`{p}`" + (f": {arch.meaning[p]}" if p in arch.meaning else "") for p in arch.params) or "none"
        out.append(f"| `{name}` | {_cell(doc)} | {_cell(takes)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    targets = {args.root / "params.yaml": render_params_yaml(args.root / "params.yaml"),
               args.root / "docs/params.md": render_docs()}
    stale = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            old = p.read_text().splitlines() if p.exists() else []
            diff = difflib.unified_diff(old, targets[p].splitlines(), str(p), "generated", lineterm="", n=0)
            print(f"{p} is stale: run `python tools/params_doc.py`\n" + "\n".join(list(diff)[:40]), file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(targets[p])
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
