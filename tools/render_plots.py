"""Render `dvc plots show`'s page offline in headless Chromium and save a screenshot.

    dvc plots show                                   # writes dvc_plots/index.html
    python tools/render_plots.py dvc_plots/index.html /tmp/plots.png

The page loads vega, vega-lite and vega-embed from a CDN. This script installs the very
versions the page names from the npm registry (``npm install`` into a temporary folder,
or ``--work``), writes a copy of the page whose script tags point at those local files, and
has Chromium screenshot it. Needs ``npm`` and ``chromium`` (Debian: ``apt-get install -y
chromium``). Nothing is written into the project but the screenshot you name.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CDN_SCRIPT = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/(?P<pkg>[\w.-]+)@(?P<version>[\w.-]+)">')
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--window-size=1400,2400", "--virtual-time-budget=10000"]


def local_bundle(node_modules: Path, pkg: str) -> Path:
    """The file jsDelivr serves for ``npm/<pkg>@<version>``: the package's ``jsdelivr`` (or
    ``unpkg``, else ``main``) entry."""
    meta = json.loads((node_modules / pkg / "package.json").read_text())
    entry = meta.get("jsdelivr") or meta.get("unpkg") or meta["main"]
    return (node_modules / pkg / entry).resolve()


def offline_copy(page: Path, work: Path) -> Path:
    """Install the page's CDN packages under ``work`` and write a copy that loads them."""
    html = page.read_text()
    wanted = {m["pkg"]: m["version"] for m in CDN_SCRIPT.finditer(html)}
    if not wanted:
        raise SystemExit(f"{page}: no cdn.jsdelivr.net/npm script tags found; is it dvc plots show's page?")
    subprocess.run(["npm", "install", "--prefix", str(work), "--no-audit", "--no-fund", "--silent",
                    # The page pins versions whose peer ranges disagree; it loads each prebuilt bundle alone.
                    "--legacy-peer-deps",
                    *(f"{p}@{v}" for p, v in wanted.items())], check=True)
    html = CDN_SCRIPT.sub(lambda m: f'<script src="{local_bundle(work / "node_modules", m["pkg"]).as_uri()}">', html)
    copy = work / "index.html"
    copy.write_text(html)
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path, help="dvc_plots/index.html")
    ap.add_argument("screenshot", type=Path, help="the PNG to write")
    ap.add_argument("--work", type=Path, help="folder for node_modules and the page's copy (default: temporary)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="render-plots-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        copy = offline_copy(args.page.resolve(), work.resolve())
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([args.chromium, *CHROMIUM_FLAGS, f"--screenshot={args.screenshot.resolve()}", copy.as_uri()],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"wrote {args.screenshot}", file=sys.stderr)


if __name__ == "__main__":
    main()
