"""Imports run one way down the kit's layers: config.py (the bottom: no other module of the kit) <- infra/ (config
and each other) <- method/ (infra and config) <- the rest (stages, run, plan, cli, nb, report, ...).

The graph is read from the source with `ast`, not by importing: every import counts, those inside functions too,
and `from humpback_nb.x import y` is an arrow to the module humpback_nb.x.y where y is one, else to humpback_nb.x.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "humpback_nb"
ROOT = next(folder for folder in Path(__file__).resolve().parents if (folder / PACKAGE / "__init__.py").is_file())


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of `package` under `root` (a package is its __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of the kit that one import statement in `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up for each dot after the first
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in known:  # `import humpback_nb.infra.files.x` is not a module: its longest one
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the modules of `package` it imports}, every import statement counted, wherever it stands."""
    modules = module_names(root, package)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets |= _targets(node, module, path.name == "__init__.py", set(modules))
        graph[module] = targets - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted: every module
    of one is imported, through the others, by itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def path_round(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One way round a circle: from its first module through imports inside it back to the first."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first, so the way shown is a short one
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    way = [node]
                    while way[-1] != start:
                        way.append(previous[way[-1]])
                    return [start, *reversed(way[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not a circle")


def _in(module: str, *names: str) -> bool:
    return any(module == f"{PACKAGE}.{name}" or module.startswith(f"{PACKAGE}.{name}.") for name in names)


def test_the_graph_builder_finds_a_circle_and_reads_every_kind_of_import(tmp_path):
    """The checks below can fail: two modules that import each other, one of them inside a function, are a circle;
    `from pkg.sub import mod` is an arrow to the module pkg.sub.mod, a relative import one to its module."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")
    (pkg / "b.py").write_text("import os\n\nimport pkg.a\nfrom pkg.sub import mod\n")
    (pkg / "sub" / "mod.py").write_text("from . import leaf\nfrom ..c import VALUE\n")
    (pkg / "sub" / "leaf.py").write_text("VALUE = 1\n")
    (pkg / "c.py").write_text("from pkg.sub.leaf import VALUE\n")

    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a", "pkg.sub.mod"}, "pkg.c": {"pkg.sub.leaf"},
                     "pkg.sub": set(), "pkg.sub.leaf": set(), "pkg.sub.mod": {"pkg.sub.leaf", "pkg.c"}}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
    assert path_round(graph, ["pkg.a", "pkg.b"]) == ["pkg.a", "pkg.b", "pkg.a"]

    (pkg / "sub" / "leaf.py").write_text("VALUE = 1\n\n\ndef g():\n    import pkg.sub.mod\n")  # leaf -> mod -> leaf
    assert circles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.leaf", "pkg.sub.mod"]]


def test_the_kits_graph_is_read():
    graph = import_graph(ROOT, PACKAGE)
    assert {"humpback_nb.config", "humpback_nb.infra.chat", "humpback_nb.method.curate"} <= set(graph)
    assert "humpback_nb.infra.chat" in graph["humpback_nb.infra.engines"]
    assert "humpback_nb.config" in graph["humpback_nb.method.curate"]


def test_no_module_of_the_kit_imports_itself_through_others():
    graph = import_graph(ROOT, PACKAGE)
    found = circles(graph)
    assert not found, "imports that go round in circles:\n" + "\n".join(
        f"  {', '.join(component)}  (e.g. {' -> '.join(path_round(graph, component))})" for component in found)


def test_infra_and_config_import_nothing_above_them():
    """infra/ may import config and infra; config nothing of the kit. Never the method, nor what runs it."""
    above = ("method", "stages", "run", "plan", "nb", "cli", "report", "export", "gpucheck")
    graph = import_graph(ROOT, PACKAGE)
    wrong = {f"{module} -> {target}" for module, targets in graph.items() if _in(module, "infra", "config")
             for target in targets if _in(target, *above) or not _in(target, "infra", "config")}
    assert not wrong, "imports that run up the layers:\n  " + "\n  ".join(sorted(wrong))


def test_the_method_imports_only_infra_and_config():
    graph = import_graph(ROOT, PACKAGE)
    wrong = {f"{module} -> {target}" for module, targets in graph.items() if _in(module, "method")
             for target in targets if not _in(target, "method", "infra", "config")}
    assert not wrong, "imports that run up the layers:\n  " + "\n  ".join(sorted(wrong))


def test_config_imports_no_module_of_the_kit():
    graph = import_graph(ROOT, PACKAGE)
    assert graph["humpback_nb.config"] == set()
