"""The recipes, defined once: ``recipes/<name>.yaml`` beside params.yaml, each holding only the
params that differ from params.yaml. The Makefile, the bench and the GPU check read them here.

    python -m imgclf.recipes speed                      # -S arguments for dvc exp run, one line
    python -m imgclf.recipes speed -S train.val_fraction=0.1 --lines   # one argument per line
    dvc exp run $(python -m imgclf.recipes speed)

A recipe may start from another (``base: speed``) and hold only what differs from it. It is
checked against the params schema, laid over the project's params.yaml, before any argument
is printed: a misspelt key or a value out of range is one line, naming the file.

No stage imports this module (it sits outside every stage's folder), so editing it reruns
nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from .core.errors import PipelineError
from .core.params import Params, parse_params, read_yaml

# The project's recipes/ folder: beside this package in a checkout (where the Makefile runs).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def names(folder: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load(name: str, folder: Path = RECIPES_DIR, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's nested overlay: as written, laid over the recipe its ``base:`` names, if any
    (``base: speed`` and the values that differ from the speed recipe)."""
    if name in _seen:
        raise PipelineError(f"recipe {name!r}: its bases loop ({' -> '.join((*_seen, name))})")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"no recipe {name!r}: {path} does not exist; recipes: {', '.join(names(folder)) or 'none'}")
    try:
        overlay = YAML(typ="safe").load(path.read_text())
    except YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(overlay, dict):
        raise PipelineError(f"{path}: expected a mapping of params sections")
    base = overlay.pop("base", None)
    if base is None:
        return overlay
    if not isinstance(base, str):
        raise PipelineError(f"{path}: base: expected the name of another recipe, not {base!r}")
    return _merge(load(base, folder, (*_seen, name)), overlay)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def _yaml_value(value: Any) -> str:
    """How ``-S key=value`` writes ``value`` so that DVC reads it back as the same YAML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value)


def set_args(name: str, extra: list[str] = (), *, params: Path = Path("params.yaml"),
             folder: Path = RECIPES_DIR) -> list[str]:
    """``["-S", "model.arch=whitened_net", ...]``: the recipe, then ``extra`` (``key=value``,
    which win), checked laid over ``params``."""
    values = _values(name, extra, folder)
    resolve(name, extra, params=params, folder=folder)
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={_yaml_value(value)}")]


def resolve(name: str, extra: list[str] = (), *, params: Path = Path("params.yaml"),
            folder: Path = RECIPES_DIR) -> Params:
    """The params a run of the recipe (then ``extra``) would train with: ``params`` with the
    recipe's values laid over it, validated."""
    tree: dict[str, Any] = {}
    for key, value in _values(name, extra, folder).items():
        *sections, last = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    base = read_yaml(params) if params.is_file() else {}
    return parse_params(_merge(base or {}, tree), f"{params} with recipe {folder / (name + '.yaml')}")


def _values(name: str, extra: list[str], folder: Path) -> dict[str, Any]:
    values = flatten(load(name, folder))
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"-S {item!r}: expected SECTION.KEY=VALUE")
        values[key] = YAML(typ="safe").load(value)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgclf.recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"a recipe in {RECIPES_DIR}")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a value that differs from the recipe's")
    parser.add_argument("--lines", action="store_true", help="one argument per line (for scripts)")
    args = parser.parse_args(argv)
    try:
        out = set_args(args.name, args.set)
    except PipelineError as e:
        print(f"error (recipes): {e}", file=sys.stderr)
        return 2
    if not args.lines and any(any(c.isspace() for c in arg) for arg in out):
        print("error (recipes): a value holds a space, which $(...) would split; use --lines "
              "(mapfile -t ARGS < <(python -m imgclf.recipes NAME --lines))", file=sys.stderr)
        return 2
    # Plain words, for `dvc exp run $(python -m imgclf.recipes NAME)`: the shell splits the
    # output on spaces and interprets no quotes, so -S download.md5='' reaches DVC as written.
    print("\n".join(out) if args.lines else " ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
