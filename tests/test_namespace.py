"""The core library stays free of the demo's dependencies (scikit-learn, matplotlib).

Only ``pruning_ir.demo`` may use them: ``import pruning_ir`` and the CLI must work with the
core dependencies alone, and no core module may import them, not even inside a function.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_ONLY = ("sklearn", "matplotlib")


def test_importing_the_library_and_cli_loads_neither_sklearn_nor_matplotlib():
    """``import pruning_ir, pruning_ir.cli``, then every other core module: none pulls in the
    demo's dependencies, and the CLI leaves the demo package unimported until ``pruning-ir demo``."""
    code = ("import json, sys, pruning_ir, pruning_ir.cli\n"
            "after_cli = sorted(name for name in sys.modules if name.split('.')[0] in {demo_only!r}\n"
            "                   or name.startswith('pruning_ir.demo'))\n"
            "import importlib, pkgutil\n"
            "for info in pkgutil.walk_packages(pruning_ir.__path__, 'pruning_ir.'):\n"
            "    if not info.name.startswith('pruning_ir.demo'):\n"
            "        importlib.import_module(info.name)\n"
            "after_core = sorted(name for name in sys.modules if name.split('.')[0] in {demo_only!r})\n"
            "print(json.dumps([after_cli, after_core]))").format(demo_only=DEMO_ONLY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    after_cli, after_core = json.loads(done.stdout.strip().splitlines()[-1])
    assert not after_cli, f"import pruning_ir, pruning_ir.cli loaded {after_cli[:5]}"
    assert not after_core, f"importing the core modules loaded {after_core[:5]}"


def test_no_core_module_imports_sklearn_or_matplotlib_anywhere():
    """Read, not run: an import deferred into a function would escape the test above."""
    offenders = []
    for path in sorted((ROOT / "pruning_ir").rglob("*.py")):
        if "demo" in path.relative_to(ROOT / "pruning_ir").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                names = []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                          if name.split(".")[0] in DEMO_ONLY]
    assert not offenders, offenders
