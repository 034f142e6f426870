"""`dvc plots show` draws offline: its page loads no script from the network (scripts/vendor_plots.py).

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine without internet every
vega plot stays blank. Setup inlines them in a page template and points this clone's DVC at it
(docs/training.md#log-and-plots); this runs `dvc plots show` in this process on a tiny DVC repository
with that template and reads the page it writes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_HINT = "run `bash scripts/setup.sh` (or `.venv/bin/python scripts/vendor_plots.py`)"
REMOTE = re.compile(r"^\s*(https?:)?//", re.I)
# An ES module import or a CSS @import of a remote address, anywhere in a script or style.
REMOTE_IMPORT = re.compile(r"""(\bimport\s*\(\s*|\bfrom\s+|@import\s+(url\()?)["']?\s*(https?:)?//""", re.I)


def vendor_plots():
    spec = importlib.util.spec_from_file_location("vendor_plots", ROOT / "scripts" / "vendor_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Page(HTMLParser):
    """The page's external references (<script src>, <link href>, <img src>...) and inline script text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.references: list[tuple[str, str]] = []   # (tag, address)
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and tag in ("script", "link", "img", "iframe", "embed", "source"):
                self.references.append((tag, attrs[name]))
        self._in_script = tag in ("script", "style")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.inline.append(data)


def configured_template() -> Path:
    from dvc.config import Config
    value = Config(dvc_dir=str(ROOT / ".dvc"))["plots"].get("html_template")
    assert value, f"this clone's DVC has no plots.html_template, so `dvc plots show` loads vega from a CDN: {SETUP_HINT}"
    return (ROOT / ".dvc" / value).resolve()


def test_the_pinned_libraries_are_the_versions_of_dvcs_own_page():
    from dvc_render.vega import VegaRenderer
    dvc_versions = re.findall(r"npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS)
    pinned = [(name, version) for name, version, _, _ in vendor_plots().PACKAGES]
    assert pinned == dvc_versions, (
        f"DVC's page now loads {dvc_versions}; pin those in scripts/vendor_plots.py's PACKAGES (with npm's "
        "`integrity` of each tarball: npm view <name>@<version> dist.integrity)")


def test_dvc_plots_show_writes_a_page_that_needs_no_network(tmp_path, monkeypatch):
    module = vendor_plots()
    template = configured_template()
    assert template == module.TEMPLATE.resolve(), f"plots.html_template is {template}, not {module.TEMPLATE}"
    assert template.is_file(), f"{template} is missing: {SETUP_HINT}"
    assert module.main(["--check"]) == 0, f"{template} is stale: {SETUP_HINT}"

    # A tiny DVC repository: one linear plot and one image, as dvc.yaml's plots section draws them.
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text(f"[core]\n    no_scm = true\n    analytics = false\n[plots]\n    html_template = {template}\n")
    (repo / "loss.tsv").write_text("step\tloss\n0\t2.3\n1\t1.7\n2\t1.2\n")
    (repo / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n")   # copied beside the page, not decoded
    (repo / "dvc.yaml").write_text("plots:\n  - grid.png\n  - Loss by step:\n      template: linear\n      x: step\n"
                                   "      y:\n        loss.tsv: loss\n")
    from dvc.cli import main
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["plots", "show", "-o", "dvc_plots"]) == 0, out.getvalue()

    index = repo / "dvc_plots" / "index.html"
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    remote = [f"<{tag}> {address}" for tag, address in page.references if REMOTE.match(address)]
    assert not remote, f"the page loads these from the network (blank offline): {remote}"
    missing = [address for _, address in page.references
               if not address.startswith("data:") and not (index.parent / address).is_file()]
    assert not missing, f"the page points at files that are not beside it: {missing}"
    imports = [m.group(0) for text in page.inline for m in REMOTE_IMPORT.finditer(text)]
    assert not imports, f"an inline script or style imports from the network: {imports}"
    # vega, vega-lite and vega-embed are in the page itself, and both plots are on it.
    code = "".join(page.inline)
    for name, version, _, _ in module.PACKAGES:
        assert f"/* {name}@{version} " in code, f"{name}@{version} is not inlined in {index}"
    assert "vegaEmbed('#Loss_by_step', spec)" in code, code[-2000:]
    assert [a for tag, a in page.references if tag == "img" and a.endswith("grid.png")], page.references
    assert os.path.getsize(index) > 500_000   # the three libraries, about 0.8 MB
