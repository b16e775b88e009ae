"""Griffe extension: Sphinx roles in docstrings (``:func:`name```) shown as inline code.

The library's docstrings are numpydoc and name other objects the Sphinx way (``:func:``,
``:class:``, ``:data:``, ``:meth:``, ``:mod:``, ...). MkDocs renders Markdown, where the role would
show as literal ``:func:`` text; this turns each into the inline code it names (``~a.b`` into
``b``, as Sphinx shows it). They are not made into links: a target may be private or have no
docstring, hence no anchor, and a link to it would fail the strict build.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|data|meth|mod|attr|exc|obj|const|ref|term):`([^`]+)`")


def _code(match: re.Match) -> str:
    target = match.group(1).strip()
    if "<" in target and target.endswith(">"):  # :ref:`text <target>` shows the text
        return f"`{target.split('<')[0].strip()}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def strip_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by the inline code it names."""
    return ROLE.sub(_code, text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
