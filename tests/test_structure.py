"""The package's structure: no import cycle among pruning_ir's modules, no module over 450
lines, no workflow reading another object's private state, no module-level mutable cache,
and every error class exported from one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pruning_ir
import pruning_ir.errors

PACKAGE = Path(pruning_ir.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> modules of the package it imports at module level (if/try blocks included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        body = list(ast.parse(path.read_text()).body)
        for node in list(body):
            if isinstance(node, (ast.If, ast.Try)):
                body.extend(getattr(node, "body", []) + getattr(node, "orelse", []))
        for node in body:
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> list[str] | None:
        colour[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if colour.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if not colour.get(target):
                found = visit(target, stack)
                if found:
                    return found
        stack.pop()
        colour[module] = 2
        return None

    for module in sorted(edges):
        if not colour.get(module):
            found = visit(module, [])
            if found:
                return found
    return None


def test_no_import_cycle_outside_package_inits():
    edges = import_graph()
    # a package's __init__ importing its own submodules is how packages work: leave those edges out
    inits = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    edges = {m: {t for t in targets if t not in inits} for m, targets in edges.items()}
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_at_most_450_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 450, {k: v for k, v in sizes.items() if v > 450}


def test_no_private_reach_across_modules():
    pattern = re.compile(r"\b(ir|self\.ir|plan\.ir|probe|selector)\._[a-z]")
    offending = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py") if p.name != "ir.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offending


def test_no_module_level_mutable_cache():
    """Module-level dicts are registries or constant tables (uppercase), never caches keyed by objects."""
    offending = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                called = ast.unparse(node.value.func)
                if "WeakKeyDictionary" in called or "WeakValueDictionary" in called or called.endswith("lru_cache"):
                    offending.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offending


def test_every_error_class_lives_in_errors_and_is_exported():
    defined = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("Error" in ast.unparse(base) for base in node.bases):
                defined.append((path.name, node.name))
    outside = [(f, n) for f, n in defined if f not in ("errors.py", "cli.py")]  # the CLI's own usage error
    assert not outside
    for _, name in defined:
        if hasattr(pruning_ir.errors, name):
            assert name in pruning_ir.__all__, name


def test_the_core_exports_what_a_criterion_author_needs():
    for name in ("Criterion", "macs", "parameter_count", "measure_latency", "PruningIR"):
        assert name in pruning_ir.__all__
