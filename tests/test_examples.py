"""The quickstart (what `make demo` runs) works end to end in its quick mode."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_and_saves_a_reloadable_ir(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--quick",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DigitsNet is still a DigitsNet" in done.stdout
    parameters = next(line for line in done.stdout.splitlines() if line.startswith("parameters")).split()
    assert int(parameters[2]) < int(parameters[1])
    assert "reloaded, it gives identical outputs" in done.stdout
    assert (tmp_path / "ir.pt").stat().st_size > 0
