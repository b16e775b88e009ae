"""dvc.yaml lists, for each stage, exactly the project modules the stage imports.

Read from the source: every ``import stages.x`` / ``from stages import x`` / ``from stages.x
import ...`` anywhere in a module (inside functions too), followed transitively. A module the
stage reaches but dvc.yaml does not list would let a change to it leave the stage's outputs
stale; one listed but never imported reruns the stage for nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_modules(module: str) -> set[str]:
    """``stages/<module>.py`` and every project module it imports, directly or not, as paths."""
    found: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = REPO / "stages" / f"{name}.py"
        if name in found or not path.is_file():
            continue
        found.add(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "stages":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stages."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("stages.")]
    return {f"stages/{name}.py" for name in found}


@pytest.mark.parametrize("stage", list(PIPELINE))
def test_code_deps_are_what_the_stage_imports(stage):
    module = PIPELINE[stage]["cmd"].split("-m ")[1].split()[0].split(".")[1]
    listed = {dep for dep in PIPELINE[stage]["deps"] if dep.startswith("stages/") and dep.endswith(".py")}
    assert listed == imported_modules(module)
