"""MkDocs hook: one API reference page per module of the ``dicomflow`` package, found at build time.

Other work adds, moves and renames modules all the time, so no list of them is written down:
``on_config`` walks ``dicomflow/`` beside ``mkdocs.yml`` and puts a nested "API reference" section
where the nav names ``reference/index.md``; ``on_files`` adds a generated page per module whose only
content is the mkdocstrings directive ``::: dicomflow.x.y``. ``dicomflow/devtools`` (the embedded
sample's generator, with its fake names and IDs) is left out, as is ``__main__``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

PACKAGE = "dicomflow"
SKIPPED = {"devtools", "__main__"}  # module path components never documented
INDEX = "reference/index.md"
# Reference pages rank below the manual's own pages in search ("quarantine" finds the faults page
# before the functions that write quarantine rows).
PAGE = "---\nsearch:\n  boost: 0.5\n---\n\n# `{name}`\n\n::: {name}\n"


def list_modules(root: Path) -> list[str]:
    """Return the dotted names of the documented modules under ``root / PACKAGE``, sorted.

    A package is listed by its own name (from its ``__init__.py``); a folder without one is not a
    package and is skipped, with everything under it.
    """
    package = root / PACKAGE
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if SKIPPED & set(parts) or any(part.startswith("_") and part != PACKAGE for part in parts):
            continue
        folders = path.parent.relative_to(root).parts
        if not all((root.joinpath(*folders[:depth]) / "__init__.py").is_file()
                   for depth in range(1, len(folders) + 1)):
            continue
        names.append(".".join(parts))
    return sorted(names)


def _page(name: str) -> str:
    return "reference/" + "/".join(name.split(".")) + ".md"


def _nav(names: list[str]) -> list:
    """Nested nav entries: a package is a section whose first page is the package itself."""
    tree: dict = {}
    for name in names:
        node = tree
        for part in name.split(".")[1:]:
            node = node.setdefault(part, {})
    def build(prefix: str, node: dict) -> list:
        entries = []
        for part in sorted(node):
            name = f"{prefix}.{part}"
            if node[part]:
                entries.append({part: [{part: _page(name)}, *build(name, node[part])]})
            else:
                entries.append({part: _page(name)})
        return entries
    return [{"Overview": INDEX}, {PACKAGE: _page(PACKAGE)}, *build(PACKAGE, tree)]


def _root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _replace(nav: list, entries: list) -> bool:
    """Put ``entries`` where ``nav`` names the reference index; return whether it did."""
    for position, item in enumerate(nav):
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if value == INDEX:
            title = next(iter(item)) if isinstance(item, dict) else "API reference"
            nav[position] = {title: entries}
            return True
        if isinstance(value, list) and _replace(value, entries):
            return True
    return False


def on_config(config):
    if config["nav"] is not None:
        _replace(config["nav"], _nav(list_modules(_root(config))))
    return config


def on_files(files, config):
    names = list_modules(_root(config))
    for name in names:
        files.append(File.generated(config, _page(name), content=PAGE.format(name=name)))
    return files
