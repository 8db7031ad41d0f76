"""The dependency rule, read from the code: every import of ours points down a layer, component families never
import each other, and there are no cycles (imports inside functions count too).

    cli  >  orchestration (build, bench, verification)  >  configuration (the targets.yaml schema, which looks
    formats and runtimes up in their registries)  >  components (stages, exporters, runtimes, cache)  >  contracts
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Where each package's files live in the repository (exporters/ and runtimes/ install as compress.exporters and
# compress.runtimes: pyproject.toml's package-dir).
SOURCES = {"compress": REPO / "compress", "compress.exporters": REPO / "exporters",
           "compress.runtimes": REPO / "runtimes"}

CONTRACTS, COMPONENTS, CONFIG, ORCHESTRATION, CLI = range(5)
LAYERS = {  # the longest matching prefix decides
    "compress": CONTRACTS,  # the package itself: its version only
    "compress.errors": CONTRACTS, "compress.hashing": CONTRACTS, "compress.home": CONTRACTS,
    "compress.progress": CONTRACTS, "compress.config": CONTRACTS, "compress.registry": CONTRACTS,
    "compress.artifact": CONTRACTS, "compress.quantized": CONTRACTS, "compress.gate": CONTRACTS,
    "compress.metrics": CONTRACTS, "compress.threads": CONTRACTS, "compress.distributed": CONTRACTS,
    "compress.llamacpp_lib": CONTRACTS, "compress.report": CONTRACTS, "compress.data": CONTRACTS,
    "compress.models": CONTRACTS, "compress.manifest": CONTRACTS, "compress.stages.configs": CONTRACTS,
    "compress.rope": CONTRACTS, "compress.memory": CONTRACTS, "compress.coreml_io": CONTRACTS,
    "compress.targets": CONFIG,
    "compress.stages": COMPONENTS, "compress.exporters": COMPONENTS, "compress.runtimes": COMPONENTS,
    "compress.cache": COMPONENTS, "compress.checkpoint": COMPONENTS,
    "compress.verification": ORCHESTRATION, "compress.build": ORCHESTRATION, "compress.bench": ORCHESTRATION,
    "compress.bench_report": ORCHESTRATION, "compress.generate": ORCHESTRATION,
    "compress.cli": CLI,
}
FAMILIES = ("compress.stages", "compress.exporters", "compress.runtimes")


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").parts
            if package == "compress" and rel[0] in ("exporters", "runtimes"):
                continue
            name = ".".join((package, *rel)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for candidate in [base] + [f"{base}.{a.name}" for a in node.names]:
                if candidate in known:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            stray = [a.name for a in node.names if isinstance(node, ast.Import)
                     and a.name.split(".")[0] in ("exporters", "runtimes")]
            stray += [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                node.module.split(".")[0] in ("exporters", "runtimes") else []
            assert not stray, f"{name} imports {stray[0]}: the installed package is compress.{stray[0]}"
    found.discard(name)
    return found


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _family(name: str) -> str:
    return next((f for f in FAMILIES if name == f or name.startswith(f + ".")), name)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert all(_layer(m) in range(5) for m in graph)


def test_imports_point_down_and_families_stay_apart(graph):
    bad = []
    for src, deps in graph.items():
        for dst in deps:
            up = _layer(dst) > _layer(src)
            sideways = _layer(dst) == _layer(src) == COMPONENTS and _family(dst) != _family(src)
            if up or sideways:
                bad.append(f"{src} -> {dst}")
    assert bad == []


def test_there_are_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_check_sees_a_bad_import(graph):
    """The rule above is not vacuous: an exporter importing a runtime, or a contract importing the orchestrator,
    is caught."""
    assert "compress.artifact" in graph["compress.exporters.onnx"]
    bad = {**graph, "compress.exporters.onnx": graph["compress.exporters.onnx"] | {"compress.runtimes.base"},
           "compress.gate": {"compress.build"}}
    flagged = [(s, d) for s, deps in bad.items() for d in deps
               if _layer(d) > _layer(s) or (_layer(d) == _layer(s) == COMPONENTS and _family(d) != _family(s))]
    assert ("compress.exporters.onnx", "compress.runtimes.base") in flagged and ("compress.gate", "compress.build") in flagged
