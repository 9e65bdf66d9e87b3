"""The documentation site: built strictly as `make docs` builds it (mkdocs.yml), every link
and anchor of the built HTML leads somewhere, and the generated reference shows every flag
each command's `--help` prints and every config key. Pages written by hand are checked
against the code by the build itself (tools/docs_hooks.py); the README, which the site does
not hold, is checked here the same way.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tools import docs_hooks, docs_reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--site-dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.startswith(("WARNING", "ERROR"))]
    assert not problems, problems
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for name in ("href", "src"):
            if attrs.get(name) and not (tag == "link" and attrs.get("rel") == "canonical"):
                self.links.append(attrs[name])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_links(site_dir: Path) -> list[str]:
    """`page: link` for every relative link or anchor that leads nowhere in the built site,
    and every resource (script, style, image) fetched from elsewhere."""
    pages = {path: _parse(path) for path in site_dir.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        if page.name == "404.html":   # a web server's answer to any path: absolute links
            continue
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme in ("http", "https", "mailto"):
                continue   # a link out (the theme's credit); resources are checked below
            if parts.scheme or link.startswith("//"):
                broken.append(f"{page.relative_to(site_dir)}: {link} (not relative)")
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site_dir)}: {link} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site_dir)}: {link} (no such anchor)")
        text = page.read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|img|link)[^>]+(?:src|href)="(https?://[^"]+)"', text)
        broken += [f"{page.relative_to(site_dir)}: loads {url}" for url in remote
                   if not url.startswith("https://squidfunk.github.io")]
    return broken


def test_the_site_builds_strictly_with_no_broken_link_or_anchor(site):
    assert (site / "index.html").exists()
    assert {p.name for p in (site / "reference").glob("*.html")} >= {
        "cli.html", "config.html", "steps.html", "signatures.html"}
    assert broken_links(site) == []


def test_the_link_checker_finds_a_missing_page_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.html").write_text('<h1 id="top">A</h1><a href="b.html#nowhere">b</a>'
                                     '<a href="c.html">c</a><a href="#top">top</a>'
                                     '<script src="https://cdn.example/x.js"></script>')
    (tmp_path / "b.html").write_text('<h1 id="here">B</h1>')
    assert sorted(broken_links(tmp_path)) == [
        "a.html: b.html#nowhere (no such anchor)", "a.html: c.html (no such file)",
        "a.html: loads https://cdn.example/x.js"]


def _text(path: Path) -> str:
    return re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")).replace("&amp;", "&")


def test_every_flag_help_prints_is_in_the_command_reference(site):
    shown = _text(site / "reference" / "cli.html")
    missing = []
    for tool, parser in docs_reference.parsers().items():
        for path, command, _ in docs_reference.walk_parsers(parser):
            for flag in set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", command.format_help())):
                if flag not in shown:
                    missing.append(f"{tool} {' '.join(path)}: {flag}")
            if path and f"{tool} {' '.join(path)}" not in shown:
                missing.append(f"{tool} {' '.join(path)} (the command)")
    assert missing == []


def test_every_config_key_is_in_the_config_reference(site):
    shown = _text(site / "reference" / "config.html")
    keys = [k.key for k in docs_reference.config_keys()]
    assert "monitor.min_requests" in keys and "train.models.cnn.epochs" in keys
    assert [key for key in keys if key not in shown] == []


def test_the_steps_and_signatures_references_show_the_declarations(site):
    from fer_pipeline.core.contract import SERVED_SIGNATURES
    from fer_pipeline.pipeline.dag import build_steps

    steps = _text(site / "reference" / "steps.html")
    assert [s.name for s in build_steps() if s.name not in steps] == []
    signatures = _text(site / "reference" / "signatures.html")
    assert [name for name in SERVED_SIGNATURES if name not in signatures] == []
    # The class dimension is the model's: 7 classes for FER-2013, 8 (contempt) for FER+.
    assert "probabilities float32 [batch, classes]" in signatures
    assert "or 8 for a FER+ model" in signatures and "Desprecio" in signatures


def test_the_readme_shows_no_flag_or_config_key_the_code_lacks():
    readme = (ROOT / "README.md").read_text()
    assert docs_hooks.unknown_flags(readme) == []
    assert docs_hooks.unknown_config_keys(readme) == []


def test_a_removed_flag_or_key_shown_in_a_page_is_caught():
    page = ("Run `fer-pipeline run --data x.csv --output run --no-such-flag` with "
            "`monitor.no_such_key: 3`, `--runner=DataflowRunner`, `monitor.min_requests`.")
    assert docs_hooks.unknown_flags(page) == ["--no-such-flag"]
    assert docs_hooks.unknown_config_keys(page) == ["monitor.no_such_key: 3"]
