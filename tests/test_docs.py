"""The manual (docs/, mkdocs.yml) builds strictly, and every docs/<page>.md#<anchor> that the README,
the code and the configuration point readers to exists."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 200

# docs/<page>.md, optionally #<anchor>, not preceded by a path or word character (so not "mydocs/").
REFERENCE = re.compile(r"(?<![\w/.-])docs/((?:[\w-]+/)*[\w-]+)\.md(?:#([\w-]+))?")
HTML_ID = re.compile(r"""\bid=["']([^"']+)["']""")


def referring_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "params.yaml", ROOT / "dvc.yaml"]
    files += sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
    files += sorted(p for p in (ROOT / "scripts").iterdir() if p.is_file())
    return [p for p in files if p.is_file()]


def references() -> list[tuple[str, str, str | None]]:
    """(where, page, anchor) of every docs reference, `where` as path:line."""
    found = []
    for path in referring_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in REFERENCE.finditer(line):
                found.append((f"{path.relative_to(ROOT)}:{number}", match.group(1), match.group(2)))
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                            str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, (
        "`mkdocs build --strict` failed (a broken link or anchor in docs/, a page missing from "
        "mkdocs.yml's nav, or mkdocs not installed: bash scripts/setup.sh installs requirements.txt). "
        f"Fix what it says:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    return out


def built_page(site: Path, page: str) -> Path:
    """Where mkdocs (use_directory_urls) writes docs/<page>.md."""
    return site / "index.html" if page == "index" else site / page / "index.html"


def test_the_site_builds_strictly(site):
    assert built_page(site, "index").is_file()


# What a page loads by itself (not a link a reader follows): a script, a stylesheet, a font, an image, a frame.
REMOTE_LOAD = re.compile(r"""<(script|link|img|iframe|source)\b(?![^>]*\brel=["']?(canonical|alternate)\b)"""
                         r"""[^>]*\b(src|href)=["']?(https?:)?//[^"'\s>]+""", re.I)
REMOTE_CSS = re.compile(r"""(@import\s+|url\(\s*)["']?(https?:)?//[^"')\s]+""", re.I)


def test_the_site_loads_nothing_from_other_servers(site):
    """Offline (a cluster's login node) the site reads the same: no Google Fonts (mkdocs.yml's `font: false`),
    no script or stylesheet from a CDN."""
    remote = [f"{page.relative_to(site)}: {m.group(0)}" for page in sorted(site.rglob("*.html"))
              for m in REMOTE_LOAD.finditer(page.read_text(errors="replace"))]
    remote += [f"{sheet.relative_to(site)}: {m.group(0)}" for sheet in sorted(site.rglob("*.css"))
               for m in REMOTE_CSS.finditer(sheet.read_text(errors="replace"))]
    assert not remote, f"the built site loads these from other servers: {remote[:10]}"


def test_every_docs_reference_resolves(site):
    found = references()
    assert found, "no docs/<page>.md reference found at all: the pattern or the file list is wrong"
    ids: dict[str, set[str]] = {}
    bad = []
    for where, page, anchor in found:
        if not (DOCS / f"{page}.md").is_file():
            bad.append(f"{where}: docs/{page}.md does not exist; point it at one of "
                       f"{sorted(p.stem for p in DOCS.glob('*.md'))}")
            continue
        if anchor is None:
            continue
        if page not in ids:
            ids[page] = set(HTML_ID.findall(built_page(site, page).read_text()))
        if anchor not in ids[page]:
            headings = sorted(i for i in ids[page] if not i.startswith("__"))
            bad.append(f"{where}: docs/{page}.md#{anchor}: no such anchor; use a heading's id "
                       f"(lowercase, punctuation dropped, spaces as hyphens), one of {headings}, "
                       f"or add the heading to docs/{page}.md")
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: it is the landing page; "
        "move the detail to a page under docs/ and link to it")


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    return []


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set(nav_pages(config.get("nav", [])))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(pages - listed)
    assert not missing, (f"pages under docs/ missing from mkdocs.yml's nav: {missing}; add each under "
                         "`nav:` in mkdocs.yml (or delete the page)")
    gone = sorted(p for p in listed - pages if not re.match(r"https?://", p))
    assert not gone, f"mkdocs.yml's nav lists pages that do not exist under docs/: {gone}; remove them"
