"""The layering rules the architecture promises, checked on the source tree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smolvmm"
# Where KVM names may appear: the backend, and the arm64 modules that list KVM's register ids.
KVM_NAMES = ("hypervisor/kvm/", "arch/arm64/regs.py", "arch/arm64/gic.py", "arch/arm64/timer.py")
# What may import the backend: the backend and the hypervisor opener.
KVM_IMPORTS = ("hypervisor/kvm/", "hypervisor/__init__.py")


def _sources() -> list[tuple[str, str]]:
    return [(str(p.relative_to(PACKAGE)), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_kvm_names_stay_in_the_backend_and_the_arm64_id_lists() -> None:
    offenders = [name for name, text in _sources() if "KVM_" in text and not name.startswith(KVM_NAMES)]
    assert offenders == []


def test_kvm_modules_are_imported_only_where_listed() -> None:
    offenders = []
    for name, text in _sources():
        if name.startswith(KVM_IMPORTS):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and "kvm" in node.module.split("."):
                offenders.append(f"{name}: from {node.module}")
    assert offenders == []


def test_the_format_package_imports_nothing_from_the_monitor() -> None:
    format_dir = PACKAGE.parent / "format" / "smolformat"
    for path in format_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.split(".")[0] == "smolvmm" for n in names), path


def test_the_cli_uses_only_the_public_api() -> None:
    """cli/*.py use the public API (``smolvmm.X`` and ``from smolvmm import X``, X in ``__all__``),
    the CLI's own modules, the developer utilities from the modules that own them (the names of
    ``smolvmm._UTILITIES``, never another name of those modules, never the monitor's internals),
    smolformat, anyio, tqdm (progress) and the standard library."""
    import smolvmm

    allowed = {"smolvmm", "smolformat", "anyio", "tqdm", *sys.stdlib_module_names}
    utilities = set()
    for name, where in smolvmm._UTILITIES.items():
        module, _, attribute = where.partition(":")
        utilities.add((module, attribute or name))
    offenders = []
    for path in sorted(PACKAGE.glob("cli/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    offenders.append(f"{path.name}: from {'.' * node.level}{module}")
                elif module == "smolvmm":  # the public API
                    offenders += [f"{path.name}: {a.name}" for a in node.names if a.name not in smolvmm.__all__]
                elif module.startswith("smolvmm.") and not module.startswith("smolvmm.cli"):
                    offenders += [
                        f"{path.name}: from {module} import {a.name}"
                        for a in node.names
                        if (module, a.name) not in utilities
                    ]
                elif module.split(".")[0] not in allowed:
                    offenders.append(f"{path.name}: from {module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.name}: import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] not in allowed
                    or (a.name.startswith("smolvmm.") and not a.name.startswith("smolvmm.cli."))
                ]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "smolvmm":
                if node.attr not in smolvmm.__all__ and node.attr != "cli":
                    offenders.append(f"{path.name}:{node.lineno}: smolvmm.{node.attr}")
    assert offenders == []


Layers = tuple[tuple[str, tuple[str, ...]], ...]
Graph = dict[str, set[str]]

# The layers of docs/ARCHITECTURE.md, bottom to top. An import may go down, or stay inside its layer as long as
# the module graph has no cycle; never up. "pkg.*" is the package and everything under it; other names are exact.
LAYERS: Layers = (
    ("common", ("smolvmm.errors", "smolvmm.config", "smolvmm.progress")),
    ("host", ("smolvmm.host.*",)),
    ("arch", ("smolvmm.arch.*",)),
    ("hypervisor", ("smolvmm.hypervisor.*",)),
    ("devices", ("smolvmm.devices.*",)),
    ("guest", ("smolvmm.images.*", "smolvmm.kernel.*")),
    ("monitor", ("smolvmm.monitor.*", "smolvmm.agent.*")),
    ("tooling", ("smolvmm.oci.*", "smolvmm.registry.*", "smolvmm.nested.*")),
    ("api", ("smolvmm",)),
    ("cli", ("smolvmm.cli.*", "smolvmm.__main__")),  # __main__ is the CLI's entry point: python -m smolvmm
)


def module_name(relative: Path) -> tuple[str, bool]:
    """``smolvmm/host/memory.py`` -> ("smolvmm.host.memory", False); an ``__init__.py`` names its package (True)."""
    parts = relative.with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(module: str, is_package: bool, source: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``source`` imports anywhere (in functions and TYPE_CHECKING blocks too).

    ``from pkg import name`` imports the module pkg.name when there is one, else pkg; relative imports are
    resolved against ``module``. Importing a module is not counted as importing its parent packages."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return found & modules


def import_graph(sources: dict[str, tuple[bool, str]]) -> Graph:
    """Each module's imports among ``sources`` ({module: (is_package, source text)})."""
    return {
        module: imported_modules(module, is_package, source, set(sources)) - {module}
        for module, (is_package, source) in sources.items()
    }


def layer_of(module: str, layers: Layers) -> int | None:
    """The index of the layer ``module`` belongs to, or None."""
    for index, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            if module == pattern.removesuffix(".*") or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return index
    return None


def upward_edges(graph: Graph, layers: Layers) -> list[tuple[str, str]]:
    """Every import of a module in a higher layer, as (importer, imported)."""
    edges = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(module, layers), layer_of(target, layers)
            if low is not None and high is not None and high > low:
                edges.append((module, target))
    return edges


def cycle_groups(graph: Graph) -> list[set[str]]:
    """The strongly connected components of more than one module: each module of one reaches every other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while (member := stack.pop()) != module:
                group.add(member)
            if group:
                groups.append(group | {module})

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups, key=min)


def shortest_cycle(graph: Graph, group: set[str]) -> list[str]:
    """The shortest import cycle through ``group``'s first module, back to where it starts."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & group):
                if target == start:
                    return paths[module] + [start]
                if target not in paths:
                    paths[target] = paths[module] + [target]
                    following.append(target)
        frontier = following
    raise ValueError(f"{sorted(group)} is not a strongly connected group")


def layer_violations(graph: Graph, layers: Layers) -> list[str]:
    """One line per module outside every layer, per upward import and per import cycle."""

    def named(module: str) -> str:
        found = layer_of(module, layers)
        return f"{module} ({'no layer' if found is None else layers[found][0]})"

    problems = [f"{named(module)} belongs to no layer" for module in sorted(graph) if layer_of(module, layers) is None]
    problems += [f"upward import: {named(a)} imports {named(b)}" for a, b in upward_edges(graph, layers)]
    for group in cycle_groups(graph):
        cycle = shortest_cycle(graph, group)
        rest = sorted(group - set(cycle))
        problems.append(f"import cycle: {' -> '.join(cycle)}" + (f" (with {', '.join(rest)})" if rest else ""))
    return problems


def _package_graph() -> Graph:
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module, is_package = module_name(path.relative_to(PACKAGE.parent))
        sources[module] = (is_package, path.read_text())
    return import_graph(sources)


def test_the_imports_obey_the_layers() -> None:
    """Every module in a layer, no import from a layer above, no cycle (docs/ARCHITECTURE.md)."""
    graph = _package_graph()
    assert "smolvmm.devices.bus" in graph["smolvmm.monitor.vm"]  # the walk found the package and its imports
    problems = layer_violations(graph, LAYERS)
    assert not problems, "\n".join(problems)


# The checks, on made-up packages: they fail where they must.
TOY_LAYERS: Layers = (("low", ("toy.low.*", "toy.base")), ("high", ("toy.high.*", "toy")))


def _toy(**modules: str) -> Graph:
    """The graph of sources named for their module: ``toy__low__a`` is toy.low.a, ``toy__low__init`` the package."""
    sources = {}
    for name, text in modules.items():
        is_package = name.endswith("__init")
        module = name.removesuffix("__init").replace("__", ".")
        sources[module] = (is_package, text)
    return import_graph(sources)


def test_the_graph_resolves_every_form_of_import() -> None:
    graph = _toy(
        toy__init="",
        toy__base="",
        toy__low__init="from . import a\n",
        toy__low__a="import toy.base\nfrom toy.low import b\nfrom .c import thing\nimport os\n",
        toy__low__b="def f():\n    from ..base import name\n",
        toy__low__c="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy import Thing\n",
        toy__high__init="",
        toy__high__d="from toy.low.a import x\nfrom .. import base\n",
    )
    assert graph == {
        "toy": set(),
        "toy.base": set(),
        "toy.low": {"toy.low.a"},
        "toy.low.a": {"toy.base", "toy.low.b", "toy.low.c"},
        "toy.low.b": {"toy.base"},
        "toy.low.c": {"toy"},
        "toy.high": set(),
        "toy.high.d": {"toy.base", "toy.low.a"},
    }


def test_an_upward_import_fails_naming_it_and_both_layers() -> None:
    clean = _toy(toy__init="", toy__low__a="", toy__high__b="from toy.low import a\n")
    assert layer_violations(clean, TOY_LAYERS) == []
    graph = _toy(toy__init="", toy__low__a="def late():\n    import toy.high.b\n", toy__high__b="")
    assert layer_violations(graph, TOY_LAYERS) == ["upward import: toy.low.a (low) imports toy.high.b (high)"]
    # The package's own __init__ is the top layer: a lower module importing a name from it is upward.
    graph = _toy(toy__init="", toy__low__a="from toy import Machine\n")
    assert layer_violations(graph, TOY_LAYERS) == ["upward import: toy.low.a (low) imports toy (high)"]


def test_an_import_cycle_fails_naming_it() -> None:
    graph = _toy(
        toy__low__a="from toy.low import b\n",
        toy__low__b="from toy.low.c import f\n",
        toy__low__c="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.low.a import A\n",
        toy__low__d="import toy.low.a\n",
    )
    assert layer_violations(graph, TOY_LAYERS) == ["import cycle: toy.low.a -> toy.low.b -> toy.low.c -> toy.low.a"]
    graph["toy.low.b"].add("toy.low.a")
    assert layer_violations(graph, TOY_LAYERS) == ["import cycle: toy.low.a -> toy.low.b -> toy.low.a (with toy.low.c)"]


def test_a_module_outside_every_layer_fails() -> None:
    graph = _toy(toy__init="", toy__low__a="", toy__lowish="", toy__extra__init="")
    assert layer_violations(graph, TOY_LAYERS) == [
        "toy.extra (no layer) belongs to no layer",
        "toy.lowish (no layer) belongs to no layer",
    ]
