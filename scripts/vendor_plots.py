#!/usr/bin/env python
"""Makes `dvc plots show` readable offline: a page template with vega, vega-lite and vega-embed inlined.

    .venv/bin/python scripts/vendor_plots.py          # setup runs it (scripts/setup.sh)
    .venv/bin/python scripts/vendor_plots.py --check  # exit 1 unless the template is current

DVC's default page loads the three libraries from a CDN (cdn.jsdelivr.net), so on a machine without
internet (a cluster's login or compute node) every vega plot of dvc_plots/index.html stays blank;
only the sample grid, a PNG, shows. This fetches the versions DVC's own page names (dvc_render's
VegaRenderer.SCRIPTS; tests/test_plots_offline.py checks they still agree) from the npm registry,
checks each tarball against its pinned sha512 (npm's `integrity`), keeps the tarballs in
.venv/dvc-plots/ (ignored by git, with the environment) and writes .venv/dvc-plots/template.html: DVC's
page with the three minified builds inlined in <script> tags. It then points this clone's DVC at it
(`dvc config --local plots.html_template`, in .dvc/config.local), so every index.html that `dvc plots
show` or `dvc plots diff` writes is self-contained: it opens as a file:// URL with no network, and the
dvc_plots/ folder can be copied anywhere. The template has no {scripts} placeholder, which is where DVC
would put its CDN <script> tags. A clone where this has not run keeps DVC's default page (the CDN).

Idempotent: a tarball already in the folder and matching its hash is not fetched again. The registry is
https://registry.npmjs.org, or $NPM_CONFIG_REGISTRY / $npm_config_registry (a mirror: the hashes still
decide). Standard library only. Docs: docs/training.md#log-and-plots, docs/setup.md#what-setup-does.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".venv" / "dvc-plots"
TEMPLATE = FOLDER / "template.html"
# DVC resolves a relative plots.html_template against .dvc/.
CONFIG_VALUE = "../.venv/dvc-plots/template.html"

# (package, version, file in its tarball, npm's integrity of the tarball): DVC's versions (dvc_render 1.0.2's
# VegaRenderer.SCRIPTS: vega@5.20.2, vega-lite@5.2.0, vega-embed@6.18.2), each file the one the CDN serves
# for that URL (the package.json's `jsdelivr` field). Order matters: vega-lite and vega-embed use vega.
PACKAGES = (
    ("vega", "5.20.2", "package/build/vega.min.js",
     "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    ("vega-lite", "5.2.0", "package/build/vega-lite.min.js",
     "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    ("vega-embed", "6.18.2", "package/build/vega-embed.min.js",
     "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
)

# dvc_render's PAGE_HTML, with the libraries in place of its {scripts} placeholder. DVC fills {plot_divs}
# (required) and {refresh_tag}.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- %(versions)s, inlined by scripts/vendor_plots.py: no network needed -->
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
DVC_PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")


def registry() -> str:
    url = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry") or "https://registry.npmjs.org"
    return url.rstrip("/")


def matches(data: bytes, integrity: str) -> bool:
    algorithm, _, digest = integrity.partition("-")
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode() == digest


def tarball(name: str, version: str, integrity: str) -> bytes:
    """The package's tarball, from the folder when it is there and intact, else from the registry."""
    path = FOLDER / f"{name}-{version}.tgz"
    if path.is_file() and matches(path.read_bytes(), integrity):
        return path.read_bytes()
    url = f"{registry()}/{name}/-/{name}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as exc:
        raise SystemExit(f"vendor_plots: could not fetch {url}: {exc}") from None
    if not matches(data, integrity):
        raise SystemExit(f"vendor_plots: {url} does not match its pinned hash {integrity}; not used")
    FOLDER.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return data


def script_of(name: str, version: str, member: str, integrity: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(tarball(name, version, integrity)), mode="r:gz") as archive:
        code = archive.extractfile(member).read().decode("utf-8")
    # Inlined in an HTML <script>: "</script" would end it, and DVC's placeholders would be replaced.
    bad = [s for s in ("</script", "<!--", *DVC_PLACEHOLDERS) if s in code.lower()]
    if bad:
        raise SystemExit(f"vendor_plots: {name}@{version}'s {member} holds {bad[0]!r}: it cannot be inlined as is")
    return f"    <script>/* {name}@{version} ({member[len('package/'):]}) */\n{code}\n    </script>"


def page() -> str:
    versions = ", ".join(f"{name}@{version}" for name, version, _, _ in PACKAGES)
    scripts = "\n".join(script_of(*package) for package in PACKAGES)
    return PAGE % {"versions": versions, "scripts": scripts}


def configure() -> None:
    """Points this clone's DVC at the template (.dvc/config.local, which git ignores)."""
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc) if dvc.is_file() else "dvc", "config", "--local", "plots.html_template", CONFIG_VALUE],
                   cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 unless the template is current; change nothing")
    parser.add_argument("--no-config", action="store_true", help="write the template but leave DVC's config alone")
    args = parser.parse_args(argv)
    if args.check:
        intact = all((FOLDER / f"{n}-{v}.tgz").is_file() and matches((FOLDER / f"{n}-{v}.tgz").read_bytes(), i)
                     for n, v, _, i in PACKAGES)   # then page() fetches nothing
        current = intact and TEMPLATE.is_file() and TEMPLATE.read_text(encoding="utf-8") == page()
        print(f"{TEMPLATE.relative_to(ROOT)}: {'current' if current else 'missing or stale: run scripts/vendor_plots.py'}")
        return 0 if current else 1
    text = page()
    if not (TEMPLATE.is_file() and TEMPLATE.read_text(encoding="utf-8") == text):
        partial = TEMPLATE.with_suffix(".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(TEMPLATE)
    if not args.no_config:
        configure()
    print(f"dvc plots: {', '.join(f'{n}@{v}' for n, v, _, _ in PACKAGES)} inlined -> {TEMPLATE.relative_to(ROOT)}"
          f"{'' if args.no_config else ' (plots.html_template in .dvc/config.local)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
