"""dvc.yaml's code deps cover what each stage imports, and nothing it does not.

The import closure is read from the source: every ``import dicomflow.x`` / ``from dicomflow.x
import y`` anywhere in a module (inside functions too), followed transitively from the stage's
own ``stages/<name>.py``. A module in the closure must be covered by a listed dep: its own file,
or the library folder it sits in (the documented choice: deps name ``dicomflow/<domain>``
folders, so a new module in a folder a stage uses is covered without anyone listing it). A
module reached but not covered would let a change to it leave the stage's outputs stale; a dep
that covers nothing in the closure reruns the stage for nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PACKAGE = "dicomflow"


def module_file(name: str) -> Path | None:
    """The source file of dotted module ``name`` in the repository, or None when it is not ours."""
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports, parents included (importing
    ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in (PACKAGE, "stages"):
                parts = target.split(".")
                names |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {name for name in names if module_file(name)}


def import_closure(stage_file: Path) -> set[Path]:
    """``stage_file`` and every project source file it imports, directly or not."""
    found, todo = set(), [stage_file]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        todo += [module_file(name) for name in imported_names(path)]
    return found


def code_deps(stage: str) -> set[str]:
    return {dep.rstrip("/") for dep in PIPELINE[stage]["deps"] if dep.split("/")[0] in (PACKAGE, "stages")}


def covering(path: Path, deps: set[str]) -> str | None:
    relative = path.relative_to(REPO)
    for candidate in (relative, *relative.parents):
        if candidate.as_posix() in deps:
            return candidate.as_posix()
    return None


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


@pytest.mark.parametrize("stage", list(PIPELINE))
def test_every_module_a_stage_imports_is_covered_by_its_deps(stage):
    module = PIPELINE[stage]["cmd"].split("-m ")[1].split()[0]
    closure = import_closure(module_file(module))
    deps = code_deps(stage)
    # A package's __init__ that holds only its docstring cannot change any output.
    uncovered = sorted(path.relative_to(REPO).as_posix() for path in closure
                       if covering(path, deps) is None and not (path.name == "__init__.py" and docstring_only(path)))
    assert uncovered == [], f"{stage} imports these, which its dvc.yaml deps do not cover"
    unused = sorted(dep for dep in deps if not any(covering(path, {dep}) for path in closure))
    assert unused == [], f"{stage} lists these deps, which nothing it imports is in"


def test_no_module_imports_a_stage():
    importers = sorted(path.relative_to(REPO).as_posix() for path in REPO.joinpath(PACKAGE).rglob("*.py")
                       if any(name.split(".")[0] == "stages" for name in imported_names(path)))
    importers += sorted(path.relative_to(REPO).as_posix() for path in REPO.joinpath("stages").glob("*.py")
                        if any(name.startswith("stages.") for name in imported_names(path)))
    assert importers == []


def test_stages_holds_the_seven_stages_in_pipeline_order():
    assert list(PIPELINE) == ["ingest", "deidentify", "validate", "split", "augment", "train", "evaluate"]
    assert sorted(path.name for path in REPO.joinpath("stages").glob("*.py")) == sorted(
        ["__init__.py", *(f"{stage}.py" for stage in PIPELINE)])
    for stage, entry in PIPELINE.items():
        assert entry["cmd"] == f"python -m stages.{stage}"


def test_only_the_command_line_reaches_the_developer_tools():
    """The registered model ships the package without ``dicomflow/devtools`` (the sample
    generator and its fake names): nothing it may import can need them."""
    reaching = sorted(path.relative_to(REPO).as_posix() for path in REPO.joinpath(PACKAGE).rglob("*.py")
                      if "devtools" not in path.parts
                      and any(name.startswith(f"{PACKAGE}.devtools") for name in imported_names(path)))
    assert reaching == ["dicomflow/cli.py"]


def test_no_library_module_knows_the_stage_runner(tmp_path):
    """Library code raises :mod:`dicomflow.errors`; only the stages and the command line import
    the runner, and the registered model's copy of the package leaves it out."""
    from dicomflow.serving.pyfunc import write_code_package

    runner = f"{PACKAGE}.runtime.stage"
    importing = sorted(path.relative_to(REPO).as_posix() for path in REPO.joinpath(PACKAGE).rglob("*.py")
                       if runner in imported_names(path))
    assert importing == ["dicomflow/cli.py"]
    shipped = write_code_package(tmp_path)
    assert (shipped / "runtime" / "parallel.py").is_file()
    assert not (shipped / "runtime" / "stage.py").exists()


def test_the_models_code_imports_only_what_it_ships():
    """The registered model carries :data:`dicomflow.serving.pyfunc.SHIPPED`: every module in it
    must import only modules in it too, or the served model fails on a machine without the repo."""
    from dicomflow.serving.pyfunc import SHIPPED

    shipped = [REPO / PACKAGE / name for name in SHIPPED]
    files = [path for root in shipped for path in ([root] if root.is_file() else root.rglob("*.py"))]
    outside = sorted({f"{path.relative_to(REPO)} imports {target.relative_to(REPO)}" for path in files
                      for target in map(module_file, imported_names(path))
                      if not any(target == root or root in target.parents for root in shipped)})
    assert outside == []


def test_no_import_cycle_in_the_library():
    """No module of the package imports itself back through others, imports inside functions
    included: a lazy import must not hide a cycle (each module can be read and tested alone)."""
    modules = {path: ".".join(path.relative_to(REPO).with_suffix("").parts)
               for path in REPO.joinpath(PACKAGE).rglob("*.py")}
    graph = {path: {module_file(name) for name in imported_names(path)} - {path} for path in modules}
    cycles, done = [], set()

    def visit(path: Path, trail: list[Path]) -> None:
        if path in trail:
            cycles.append(" -> ".join(modules[step] for step in trail[trail.index(path):] + [path]))
            return
        if path in done:
            return
        for target in sorted(graph.get(path, ())):
            visit(target, trail + [path])
        done.add(path)

    for path in sorted(modules):
        visit(path, [])
    assert cycles == []
