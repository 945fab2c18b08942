"""The examples work end to end in their quick mode (the quickstart is what `make demo` runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_and_saves_a_reloadable_ir(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--quick",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DigitsResNet is still a DigitsResNet" in done.stdout
    parameters = next(line for line in done.stdout.splitlines() if line.startswith("parameters")).split()
    assert int(parameters[2]) < int(parameters[1])
    assert "reloaded, both give identical outputs" in done.stdout
    assert (tmp_path / "quickstart-model" / "pruning_config.json").is_file()
    assert (tmp_path / "ir.pt").stat().st_size > 0


def run_example(name: str, *arguments: str) -> str:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *arguments],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def table_row(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(name))[len(name):]


def test_bert_latency_budget_meets_its_target():
    stdout = run_example("bert_latency_budget.py", "--quick")
    achieved = float(re.search(r"achieved/target (\d+\.\d+)", stdout).group(1))
    assert achieved <= 1.0 + 1e-9   # the selector returns a selection it measured under the target
    for row in ("parameters", "MACs"):
        before, after = (int(n.replace(",", "")) for n in table_row(stdout, row).split())
        assert after < before, row
    def per_layer_total(row: str) -> list[int]:
        return [sum(map(int, values.split(","))) for values in re.findall(r"\[([\d, ]+)\]", table_row(stdout, row))]

    heads_before, heads_after = per_layer_total("heads per layer")
    inner_before, inner_after = per_layer_total("intermediate size")
    # which of heads or MLP units the knapsack removes depends on measured (noisy) latency; not both kept
    assert heads_after <= heads_before and inner_after <= inner_before
    assert heads_after < heads_before or inner_after < inner_before
    assert ("BertForSequenceClassification is still a BertForSequenceClassification: on the same input_ids "
            "and attention_mask it gives logits of shape (16, 2) (as before)") in stdout


def test_custom_leaf_module_example_prunes_around_its_leaves():
    stdout = run_example("custom_leaf_module.py")
    assert "TracingError: in submodule 'denoise'" in stdout
    assert "values leave torch through .numpy()" in stdout
    assert "leaf module 'denoise' (MedianDenoise) has no channel rule" in stdout
    assert "leaf module 'router' (Router) has no channel rule" in stdout
    assert "leaf module declared with prunable_input=False" in stdout
    before, after = map(int, re.search(r"parameters (\d+) -> (\d+)", stdout).groups())
    assert after < before
    for path in ("quiet", "loud"):
        assert (f"before output (8, 5), Router took its {path} path; "
                f"after output (8, 5), Router took its {path} path") in stdout
    assert "LSTM input size kept: 48" in stdout
