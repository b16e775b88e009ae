"""The page ``dvc plots show`` fills, with Vega inlined: every plot renders with no network.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline its data plots
(training curves, ROC, confusion, precision-recall, calibration) come out blank, without a
message, while its image plots show. ``.dvc/config`` names this page instead
(``[plots] html_template = plots.html``, a path relative to ``.dvc/``); it has no ``{scripts}``
placeholder, so DVC adds no CDN script to it. The scripts are the releases DVC 3.67's
``dvc_render`` asks for (:data:`RELEASES`), taken from the npm registry by this module's
``main`` (run it again after a DVC upgrade that moves them)::

    python -m dicomflow.devtools.plots_page .dvc/plots.html
"""

from __future__ import annotations

import html
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# package -> (version, the file of its npm tarball that is inlined): dvc_render.vega.VegaRenderer.SCRIPTS
RELEASES = {
    "vega": ("5.20.2", "package/build/vega.min.js"),
    "vega-lite": ("5.2.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "package/build/vega-embed.min.js"),
}
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")


def plots_page(scripts: dict[str, str]) -> str:
    """The HTML template: ``scripts`` (package name -> JavaScript) inlined in the order given,
    then DVC's ``{plot_divs}``; ``{refresh_tag}`` for ``dvc plots show --refresh``.

    Raises
    ------
    ValueError
        A script that would end its ``<script>`` element early, or that holds a placeholder DVC
        would fill (DVC fills them by plain text replacement).
    """
    for name, code in scripts.items():
        if "</script" in code.lower():
            raise ValueError(f"{name}: the script holds '</script', which would end its element early")
        for placeholder in PLACEHOLDERS:
            if placeholder in code:
                raise ValueError(f"{name}: the script holds {placeholder}, which DVC would replace")
    inlined = "\n".join(f"<script>/* {html.escape(name)} */\n{code}\n</script>" for name, code in scripts.items())
    releases = ", ".join(f"{name} {RELEASES[name][0]}" if name in RELEASES else name for name in scripts)
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>dicomflow plots</title>
<!-- Written by dicomflow/devtools/plots_page.py: {releases} (BSD-3-Clause, University of
     Washington Interactive Data Lab), inlined so that the page needs no network. -->
{inlined}
<style>
body {{ font-family: sans-serif; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def read_release(tarball: Path, member: str) -> str:
    """One file of an npm package tarball, as text."""
    with tarfile.open(tarball) as archive:
        extracted = archive.extractfile(member)
        if extracted is None:
            raise ValueError(f"{tarball.name} has no file {member}")
        return extracted.read().decode("utf-8")


def main(out: Path) -> None:
    """Fetch the pinned releases with ``npm pack`` (which checks the registry's integrity hash)
    and write the page to ``out``."""
    with tempfile.TemporaryDirectory() as folder:
        scripts = {}
        for name, (version, member) in RELEASES.items():
            packed = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=folder,
                                    check=True, capture_output=True, text=True).stdout.split()[-1]
            scripts[name] = read_release(Path(folder) / packed, member)
    out.write_text(plots_page(scripts), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dicomflow.devtools.plots_page OUT.html")
    main(Path(sys.argv[1]))
