"""The manual: `mkdocs build --strict` succeeds, fails on a broken link or a missing reference,
loads nothing from outside the site, documents every module but devtools; the README stays short.

The builds run the real MkDocs with the project's ``mkdocs.yml`` (about 10 s each on 2 cores), so
they are marked slow; the README and the asset scanner's own checks are fast.
"""

from __future__ import annotations

import os
import pkgutil
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

# Elements and attributes through which a page makes the browser fetch something.
FETCHING = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src",
            "audio": "src", "embed": "src", "object": "data"}
LINK_RELS_NOT_FETCHED = {"canonical", "alternate", "author", "license", "next", "prev", "search"}
CSS_EXTERNAL = re.compile(r"""(?:url\(\s*["']?|@import\s+["']?)(?:https?:)?//""", re.IGNORECASE)


class _AssetParser(HTMLParser):
    """Collect every URL a page would fetch as a stylesheet, script, font, image or frame."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.styles: list[str] = []  # style attributes that load from outside

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "link":
            rels = set(values.get("rel", "").lower().split())
            if rels and rels <= LINK_RELS_NOT_FETCHED:
                return
            self.urls.append(values.get("href", ""))
        elif tag in FETCHING:
            self.urls.append(values.get(FETCHING[tag], ""))
        if "style" in values and CSS_EXTERNAL.search(values["style"]):
            self.styles.append(values["style"])


def external_assets(html: str) -> list[str]:
    """URLs outside the site (``http:``, ``https:`` or protocol-relative) that ``html`` loads."""
    parser = _AssetParser()
    parser.feed(html)
    loaded = [url for url in parser.urls if re.match(r"(?:https?:)?//", url.strip(), re.IGNORECASE)]
    loaded += parser.styles
    for style in re.findall(r"<style[^>]*>(.*?)</style>", html, flags=re.DOTALL | re.IGNORECASE):
        loaded += CSS_EXTERNAL.findall(style)
    return loaded


def documented_modules() -> set[str]:
    """Every module of the dicomflow package except devtools and __main__, found by pkgutil."""
    names = {"dicomflow"}
    stack = [(ROOT / "dicomflow", "dicomflow")]
    while stack:
        folder, prefix = stack.pop()
        for info in pkgutil.iter_modules([str(folder)]):
            if info.name in {"devtools", "__main__"}:
                continue
            names.add(f"{prefix}.{info.name}")
            if info.ispkg:
                stack.append((folder / info.name, f"{prefix}.{info.name}"))
    return names


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``, run from the repository root."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def copy_project_docs(target: Path) -> Path:
    """A copy of mkdocs.yml and docs/ beside the real package, to break on purpose."""
    shutil.copytree(ROOT / "docs", target / "docs")
    shutil.copy(ROOT / "mkdocs.yml", target / "mkdocs.yml")
    (target / "dicomflow").symlink_to(ROOT / "dicomflow", target_is_directory=True)
    return target / "mkdocs.yml"


class TestReadme:
    def test_readme_is_at_most_200_lines(self):
        lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
        assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"

    def test_readme_names_the_commands_and_the_docs(self):
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        for command in ("make repro", "make test", "make check", "make docs"):
            assert command in text


class TestSphinxRoles:
    """docs/hooks/griffe_roles.py: Sphinx roles in docstrings become inline code."""

    @pytest.fixture(scope="class")
    def strip_roles(self):
        sys.path.insert(0, str(ROOT / "docs" / "hooks"))
        try:
            from griffe_roles import strip_roles
        finally:
            sys.path.remove(str(ROOT / "docs" / "hooks"))
        return strip_roles

    @pytest.mark.parametrize(("text", "expected"), [
        (":func:`load_profile` reads", "`load_profile` reads"),
        ("see :class:`~dicomflow.deid.profile.Profile`.", "see `Profile`."),
        (":py:meth:`Profile.rule_for` and :data:`KEPT_TEXT`", "`Profile.rule_for` and `KEPT_TEXT`"),
        (":ref:`the table <kept-text>`", "`the table`"),
        ("plain `code` stays", "plain `code` stays"),
    ])
    def test_role_becomes_inline_code(self, strip_roles, text, expected):
        assert strip_roles(text) == expected


class TestExternalAssets:
    """The scanner itself finds what it must, so the site test below can fail."""

    @pytest.mark.parametrize("html", [
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">',
        '<link rel="preconnect" href="https://fonts.gstatic.com">',
        '<script src="https://unpkg.com/iframe-worker/shim"></script>',
        '<script src="//cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>',
        '<img src="http://example.org/logo.png">',
        '<style>@import url("https://fonts.googleapis.com/css2?family=Inter");</style>',
        '<div style="background: url(https://example.org/a.png)"></div>',
    ])
    def test_finds_an_external_asset(self, html):
        assert external_assets(html)

    @pytest.mark.parametrize("html", [
        '<link rel="stylesheet" href="assets/stylesheets/main.css">',
        '<script src="../assets/javascripts/bundle.js"></script>',
        '<a href="https://distributed.dask.org">Dask</a>',
        '<link rel="canonical" href="https://example.org/page/">',
    ])
    def test_ignores_local_assets_and_plain_links(self, html):
        assert external_assets(html) == []


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return site


@pytest.mark.slow
class TestSite:
    def test_strict_build_succeeds(self, built_site):
        assert (built_site / "index.html").is_file()
        assert (built_site / "search" / "search_index.json").is_file()

    def test_no_page_loads_anything_from_outside_the_site(self, built_site):
        pages = sorted(built_site.rglob("*.html"))
        assert len(pages) > 20
        found = {str(page.relative_to(built_site)): urls for page in pages
                 if (urls := external_assets(page.read_text(encoding="utf-8")))}
        assert found == {}
        stylesheets = {str(css.relative_to(built_site)): CSS_EXTERNAL.findall(css.read_text("utf-8"))
                       for css in built_site.rglob("*.css")}
        assert {name: hits for name, hits in stylesheets.items() if hits} == {}

    def test_theme_fetches_no_fonts(self, built_site):
        index = (built_site / "index.html").read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in index and "fonts.gstatic.com" not in index

    def test_every_module_but_devtools_has_a_reference_page(self, built_site):
        for name in documented_modules():
            page = built_site / "reference" / (name.replace(".", "/") + ".html")
            assert page.is_file(), f"no API reference page for {name}"
            assert 'class="doc doc-' in page.read_text(encoding="utf-8"), f"{name}: not rendered by mkdocstrings"
        assert not list((built_site / "reference").rglob("*devtools*"))
        assert not list((built_site / "reference").rglob("*__main__*"))

    def test_no_fake_identifying_value_of_the_sample_is_published(self, built_site):
        from dicomflow.devtools import sample_data

        # Distinctive values only: surnames alone (Johnson) also appear in citations.
        people = (*sample_data.PHYSICIANS, *sample_data.OPERATORS)
        values = [*sample_data.CITIES, *sample_data.STREETS, *people,
                  *(" ".join(reversed(name.split("^"))) for name in people),
                  *(part for institution in sample_data.INSTITUTIONS for part in institution[:2])]
        published = "\n".join(path.read_text(encoding="utf-8") for path in built_site.rglob("*")
                              if path.suffix in {".html", ".json", ".js", ".xml"})
        assert [value for value in values if value in published] == []

    def test_reference_shows_no_sphinx_roles(self, built_site):
        roles = re.compile(r":(func|class|data|meth|mod|attr|exc):")
        shown = [str(page.relative_to(built_site)) for page in (built_site / "reference").rglob("*.html")
                 if roles.search(page.read_text(encoding="utf-8"))]
        assert shown == []

    def test_a_broken_link_fails_the_build(self, tmp_path):
        config = copy_project_docs(tmp_path)
        page = tmp_path / "docs" / "getting-started.md"
        page.write_text(page.read_text(encoding="utf-8") + "\n[gone](no-such-page.md)\n",
                        encoding="utf-8")
        result = build(config, tmp_path / "site")
        assert result.returncode != 0
        assert "no-such-page.md" in result.stderr

    def test_a_missing_reference_fails_the_build(self, tmp_path):
        config = copy_project_docs(tmp_path)
        page = tmp_path / "docs" / "getting-started.md"
        page.write_text(page.read_text(encoding="utf-8")
                        + "\nSee [the loader][dicomflow.config.no_such_function].\n",
                        encoding="utf-8")
        result = build(config, tmp_path / "site")
        assert result.returncode != 0
        assert "dicomflow.config.no_such_function" in result.stderr
