"""dvc.yaml's code deps cover what each stage imports, and nothing it does not.

The import closure is read from the source: every ``import dicomflow.x`` / ``from dicomflow.x
import y`` anywhere in a module (inside functions too), followed transitively from the stage's
own ``stages/<name>.py``. A module in the closure must be covered by a listed dep: its own file,
or the library folder it sits in (the documented choice: deps name ``dicomflow/<domain>``
folders, so a new module in a folder a stage uses is covered without anyone listing it). A
module reached but not covered would let a change to it leave the stage's outputs stale; a dep
that covers nothing in the closure reruns the stage for nothing.

The same holds for params (below): a stage's ``params:`` are exactly the ``params.yaml`` keys its
code reads, found in the source too.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from dicomflow.config.params import SECTIONS

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


def test_stages_holds_the_stages_in_pipeline_order():
    # secret first: its fingerprint of the de-identification secret is a dep of deidentify
    assert list(PIPELINE) == ["secret", "ingest", "deidentify", "validate", "split", "augment", "pretrain", "train",
                              "evaluate"]
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


# ---- params: each stage's `params:` list is the params.yaml keys its code reads ----------------
#
# Read from the source as the code deps are: every ``load_params("<section>")`` call of the stage
# module, followed wherever the section object goes (assigned to a name, passed to a function or a
# class's method of the project, through ``functools.partial`` too), records ``section.key`` for
# each ``<object>.key`` read. Where the object goes somewhere the source cannot be followed (a
# constructor, a container, a function outside the project), the stage is taken to read the whole
# section. ``read_params_file`` (the params logged to MLflow) is not a read here: MLflow is not an
# output DVC tracks. ``load_params("paths")`` is no params read either: it reads the file locations
# that dvc.yaml declares in its ``vars`` and interpolates into deps and outs.

WHOLE = "*"


class _Source:
    """A parsed project file: its tree, each node's parent, and its top-level and imported names."""

    parsed: dict[Path, _Source] = {}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"))
        self.parent = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}
        self.defs = {node.name: node for node in self.tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        self.imports = {alias.asname or alias.name: (node.module, alias.name) for node in ast.walk(self.tree)
                        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        for alias in node.names}

    @classmethod
    def of(cls, path: Path) -> _Source:
        if path not in cls.parsed:
            cls.parsed[path] = cls(path)
        return cls.parsed[path]

    def definition(self, name: str) -> tuple[_Source, ast.AST] | None:
        """The project ``def`` or ``class`` that ``name`` means in this file, and its file."""
        if name in self.defs:
            return self, self.defs[name]
        module, original = self.imports.get(name, ("", ""))
        path = module_file(module) if module.split(".")[0] in (PACKAGE, "stages") else None
        return _Source.of(path).definition(original) if path else None

    def scope(self, node: ast.AST) -> ast.AST:
        while not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Module)):
            node = self.parent[node]
        return node

    def where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path.name}:{node.lineno}"


def _callee(source: _Source, func: ast.expr) -> tuple[_Source, ast.FunctionDef, int] | None:
    """The project function that calling ``func`` runs, and how many of its leading parameters the
    call fills by itself (``cls`` of a class method called on its class)."""
    if isinstance(func, ast.Name):
        found = source.definition(func.id)
        if found and isinstance(found[1], ast.FunctionDef):
            return found[0], found[1], 0
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        found = source.definition(func.value.id)
        if found and isinstance(found[1], ast.ClassDef):
            for node in found[1].body:
                if isinstance(node, ast.FunctionDef) and node.name == func.attr:
                    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
                    return found[0], node, 0 if static else 1
    return None


class ParamReads:
    """The ``section.key`` names a stage reads, and where it reads a whole section."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = {}
        self.whole_at: dict[str, str] = {}  # section -> where its object went out of sight
        self._followed: set[tuple[int, str, str]] = set()

    def _read(self, section: str, key: str, source: _Source, node: ast.AST) -> None:
        if key == WHOLE:
            self.whole_at.setdefault(section, source.where(node))
        self.keys.setdefault(section, set()).add(key)

    def follow(self, source: _Source, node: ast.expr, section: str) -> None:
        """Record what is read of ``section`` through ``node``, an expression holding its object."""
        parent = source.parent[node]
        if isinstance(parent, ast.Attribute) and parent.value is node:
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            return self._read(section, parent.attr if parent.attr in fields else WHOLE, source, node)
        if isinstance(parent, ast.Assign) and parent.value is node and isinstance(parent.targets[0], ast.Name):
            return self.follow_name(source, source.scope(parent), parent.targets[0].id, section)
        assign = source.parent.get(parent)
        if (isinstance(parent, ast.Tuple) and isinstance(assign, ast.Assign) and assign.value is parent
                and isinstance(assign.targets[0], ast.Tuple)):  # a, b = load_params(...), load_params(...)
            target = assign.targets[0].elts[parent.elts.index(node)]
            if isinstance(target, ast.Name):
                return self.follow_name(source, source.scope(parent), target.id, section)
        if isinstance(parent, ast.keyword) and parent.arg:
            call, position, keyword = source.parent[parent], None, parent.arg
        elif isinstance(parent, ast.Call) and node in parent.args:
            call, position, keyword = parent, parent.args.index(node), None
        else:
            return self._read(section, WHOLE, source, node)
        func = call.func
        if isinstance(func, (ast.Name, ast.Attribute)) and getattr(func, "id", getattr(func, "attr", "")) == "partial":
            func, position = call.args[0], None if position is None else position - 1
        found = _callee(source, func)
        if found is None or (position is not None and any(isinstance(a, ast.Starred) for a in call.args)):
            return self._read(section, WHOLE, source, node)
        callee_source, function, filled = found
        arguments = function.args
        if keyword is not None:
            names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
            parameter = keyword if keyword in names else None
        else:
            positional = [a.arg for a in (*arguments.posonlyargs, *arguments.args)][filled:]
            parameter = positional[position] if position < len(positional) else None
        if parameter is None:  # into **kwargs or *args
            return self._read(section, WHOLE, source, node)
        self.follow_name(callee_source, function, parameter, section)

    def follow_name(self, source: _Source, scope: ast.AST, name: str, section: str) -> None:
        """Follow each use of the variable ``name`` of ``scope``, which holds ``section``'s object."""
        if (id(scope), name, section) in self._followed:
            return
        self._followed.add((id(scope), name, section))
        for node in ast.walk(scope):
            if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load):
                self.follow(source, node, section)


def params_read(module_path: Path) -> ParamReads:
    """What the stage module at ``module_path`` reads of ``params.yaml`` (see above)."""
    source, reads = _Source.of(module_path), ParamReads()
    for node in ast.walk(source.tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "load_params"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in SECTIONS):
            reads.follow(source, node, node.args[0].value)
    return reads


def expanded(names: dict[str, set[str]]) -> set[str]:
    """``section.key`` for each key, every key of a section named whole."""
    return {f"{section}.{key}" for section, keys in names.items()
            for key in ([f.name for f in dataclasses.fields(SECTIONS[section])] if WHOLE in keys else keys)}


def declared_params(stage: str) -> dict[str, set[str]]:
    """A stage's ``params:`` of dvc.yaml as section -> keys (``*``: the whole section)."""
    names: dict[str, set[str]] = {}
    for entry in PIPELINE[stage].get("params", []):
        for name in ([entry] if isinstance(entry, str) else entry.get("params.yaml", [])):
            section, _, key = name.partition(".")
            names.setdefault(section, set()).add(key or WHOLE)
    return names


@pytest.mark.parametrize("stage", list(PIPELINE))
def test_the_params_a_stage_lists_are_the_params_it_reads(stage):
    module = PIPELINE[stage]["cmd"].split("-m ")[1].split()[0]
    reads = params_read(module_file(module))
    declared, read = expanded(declared_params(stage)), expanded(reads.keys)
    whole = "; ".join(f"all of {s} (its object passed on at {at})" for s, at in sorted(reads.whole_at.items()))
    assert sorted(read - declared) == [], f"{stage} reads these, which its dvc.yaml params do not list. {whole}"
    assert sorted(declared - read) == [], f"{stage} lists these params, which it does not read. {whole}"


def test_the_params_reader_follows_the_object_and_gives_up_where_it_cannot(tmp_path):
    """The reader on a stage written for the test: keys read directly, through a helper and a
    partial; a section that goes into a container counts whole."""
    package = tmp_path / "stages"
    package.mkdir()
    (package / "probe.py").write_text(
        "import functools\n"
        "from dicomflow.config.params import load_params\n"
        "from dicomflow.dicom.display import PixelSettings\n\n"
        "def _seeded(*, split):\n"
        "    return split.seed\n\n"
        "def main():\n"
        "    paths, split = load_params('paths'), load_params('split')\n"
        "    size = split.val_size\n"
        "    run = functools.partial(_seeded, split=split)\n"
        "    pixels = PixelSettings.from_params(load_params('ingest'))\n"
        "    kept = [load_params('augment')]\n"
        "    return paths.data, size, run, pixels, kept, load_params('train').epochs\n")
    probe = package / "probe.py"
    reads = params_read(probe)
    assert reads.keys == {
        "split": {"val_size", "seed"},
        "ingest": {"image_size", "channels", "frames", "voi_index", "target_spacing_mm", "pixel_dtype",
                   "max_decoded_mib", "color_management", "decode"},
        "augment": {WHOLE},
        "train": {"epochs"},
    }
    assert reads.whole_at == {"augment": "probe.py:13"}
