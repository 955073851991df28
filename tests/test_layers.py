"""The package's layers, as the folder tree shows them, hold in the code.

    vtlab/arch, vtlab/errors.py   facts: the SDM's tables and the error vocabulary
    vtlab/cpu                     the processor (the only package that touches Unicorn)
    vtlab/vmm                     the hypervisor (only the processor's public API)
    vtlab/analysis                cost model and figures over a VMM's trace
    vtlab/lab                     what a learner touches: widgets, ring lab, CLI ...
    vtlab/__init__.py             the facade that re-exports the public API

Read from the source with :mod:`ast` (nothing is imported), so a violation is found
even in code no test runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vtlab"

#: layer rank of each top-level part of the package (lower may not import higher)
LAYERS = {"arch": 0, "errors": 0, "cpu": 1, "vmm": 2, "analysis": 3, "lab": 4,
          "__init__": 9, "__main__": 9, "_aliases": 9}
#: third-party engines only the processor layer may import
ENGINES = {"unicorn", "capstone", "ziglang"}
#: attributes that are the processor's internals, whatever their spelling
PROCESSOR_INTERNALS = {"uc", "monitor"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: {top!r} belongs to no layer (add it to LAYERS)"
    return top, LAYERS[top]


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(module: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:   # "from . import cost": the module itself
                    out.append((node.lineno, sub, None))
                else:
                    out.append((node.lineno, target, a.name))
    return out


def internal(target: str) -> str | None:
    """The vtlab module an import names (None for anything outside vtlab)."""
    if target != "vtlab" and not target.startswith("vtlab."):
        return None
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_imports(module):
    name, rank = layer_of(module)
    for line, target, _ in imports(module):
        dep = internal(target)
        if dep is None:
            continue
        dep_name, dep_rank = layer_of(dep)
        assert dep_rank <= rank, (f"{module} (layer {name}) line {line} imports {dep} "
                                  f"from the higher layer {dep_name}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_processor_imports_the_engines(module):
    name, _ = layer_of(module)
    for line, target, _ in imports(module):
        if target.split(".")[0] in ENGINES:
            assert name == "cpu", f"{module} line {line} imports {target}: only vtlab.cpu may"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_layers(module):
    name, _ = layer_of(module)
    for line, target, imported in imports(module):
        dep = internal(target)
        if dep is None or imported is None or layer_of(dep)[0] == name:
            continue
        assert not (imported.startswith("_") and not imported.startswith("__")), (
            f"{module} line {line} imports the private name {imported} of {dep}")
    if name in ("cpu", "arch"):
        return
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value.id if isinstance(node.value, ast.Name) else None
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        assert not (private and owner not in ("self", "cls")), (
            f"{module} line {node.lineno}: {ast.unparse(node)} reaches a private name")
        assert node.attr not in PROCESSOR_INTERNALS, (
            f"{module} line {node.lineno}: {ast.unparse(node)} reaches into the processor")


def test_no_import_cycles():
    graph = {m: {internal(t) for _, t, _ in imports(m)} - {None, m} for m in MODULES}
    # A package importing its own submodules (re-exports) is not a cycle of modules.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_violation(tmp_path):
    """The checks above are not vacuous: they find the imports they are meant to find."""
    found = imports("vtlab.vmm.machine")
    assert any(internal(t) and internal(t).startswith("vtlab.cpu") for _, t, _ in found)
    assert layer_of("vtlab.lab.widgets")[1] > layer_of("vtlab.cpu.vmx")[1]
