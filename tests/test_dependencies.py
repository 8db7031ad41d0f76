"""Every dependency pyproject.toml declares earns its place: our code (or the tests, for `dev`) imports it, or a
library we use imports it without declaring it, which this test checks in that library's installed source."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMPORT_NAMES = {"huggingface-hub": "huggingface_hub", "pyyaml": "yaml", "onnx-ir": "onnx_ir", "coreai-core": "coreai",
                "onnxruntime-genai": "onnxruntime_genai", "llama-cpp-python": "llama_cpp"}
# Declared but never imported here: (the module that imports it, a line of that module's source that shows it).
NEEDED_BY = {
    "accelerate": ("transformers.modeling_utils", "accelerate is required when loading a GGUF file"),
    "jinja2": ("transformers.utils.chat_template_utils", "import jinja2"),
    "onnx-ir": ("onnxruntime_genai.models.builders.base", "import onnx_ir as ir"),
}
TOOLS = {"ruff": "[tool.ruff]"}  # command-line tools, configured in pyproject.toml


def _requirements() -> list[tuple[str, str]]:
    """(extra or "", distribution name) for every requirement; `compress[...]` self-references skipped."""
    out = [("", r) for r in PYPROJECT["project"]["dependencies"]]
    out += [(extra, r) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items() for r in reqs]
    return [(extra, re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower()) for extra, r in out
            if not r.startswith("compress[")]


@functools.cache
def _imported(roots: tuple[Path, ...]) -> set[str]:
    names = set()
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("find_spec", "import_module"):
                    names |= {a.value.split(".")[0] for a in node.args[:1] if isinstance(a, ast.Constant)}
                elif isinstance(node, ast.List):  # a child process's command: [sys.executable, "-m", "pkg.mod", ...]
                    items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                    names |= {items[i + 1].split(".")[0] for i, v in enumerate(items[:-1])
                              if v == "-m" and isinstance(items[i + 1], str)}
    return names


SOURCES = (REPO / "compress", REPO / "exporters", REPO / "runtimes")


@pytest.mark.parametrize("extra, name", _requirements())
def test_each_declared_dependency_is_imported_or_needed_by_a_library_that_is(extra, name):
    module = IMPORT_NAMES.get(name, name.replace("-", "_"))
    if name in TOOLS:
        assert TOOLS[name] in (REPO / "pyproject.toml").read_text()
        return
    roots = SOURCES + ((REPO / "tests",) if extra == "dev" else ())
    if module in _imported(roots):
        assert name not in NEEDED_BY, f"{name} is imported here now: drop it from NEEDED_BY"
        return
    assert name in NEEDED_BY, f"{name} ({extra or 'core'}) is declared but nothing here imports it"
    user, evidence = NEEDED_BY[name]
    spec = importlib.util.find_spec(user)
    if spec is None:
        pytest.skip(f"{user} is not installed (extra {extra!r})")
    assert evidence in Path(spec.origin).read_text(), f"{user} no longer needs {name}: drop it"
