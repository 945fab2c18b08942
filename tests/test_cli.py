"""The `pruning-ir` command end to end, through a subprocess: success and every bad spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

from pruning_ir import load_pruned
from pruning_ir.latency import macs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class SmallNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    def small_net():
        torch.manual_seed(0)
        return SmallNet()

    def broken():
        raise RuntimeError("cannot build")

    def not_a_model():
        return 42

    NOT_CALLABLE = 3
""")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / "cli_models.py").write_text(MODELS)
    return folder


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "pruning_ir.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=environment)


def small_net(models_dir):
    sys.path.insert(0, str(models_dir))
    try:
        import cli_models
        return cli_models.small_net()
    finally:
        sys.path.remove(str(models_dir))


def test_console_script_is_declared():
    scripts = entry_points(group="console_scripts", name="pruning-ir")
    assert [script.value for script in scripts] == ["pruning_ir.cli:main"]


def test_inspect_lists_groups(models_dir):
    done = run_cli("inspect", "cli_models:small_net", "--input-shape", "1,3,16,16", cwd=models_dir)
    assert done.returncode == 0, done.stderr
    assert "PruningIR(SmallNet): 48 labels in 2 prunable groups" in done.stdout
    assert "features.0" in done.stdout and "features.3.weight[0]" in done.stdout


def test_inspect_accepts_a_file_path(models_dir, tmp_path):
    done = run_cli("inspect", f"{models_dir / 'cli_models.py'}:SmallNet", "--input-shape", "1x3x8x8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 prunable groups" in done.stdout


def test_prune_uniform_writes_a_loadable_model_with_rounded_widths(models_dir, tmp_path):
    out = tmp_path / "out"
    done = run_cli("prune", "cli_models:small_net", "--input-shape", "1,3,16,16", "--criterion", "magnitude",
                   "--selector", "uniform", "--ratio", "0.5", "--round-to", "4", "--out", str(out), cwd=models_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["outputs_keep_their_shapes"] is True
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert "Channels per dependency group" in (out / "report.md").read_text()
    model = load_pruned(small_net(models_dir), out / "pruned-model")
    assert model.features[0].out_channels == 8 and model.features[3].out_channels == 16
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_prune_knapsack_meets_the_macs_target(models_dir, tmp_path):
    out = tmp_path / "out"
    done = run_cli("prune", "cli_models:small_net", "--input-shape", "1,3,16,16", "--criterion", "random",
                   "--macs", "0.5", "--quiet", "--out", str(out), cwd=models_dir)  # --macs: the knapsack
    assert done.returncode == 0, done.stderr
    example = torch.randn(1, 3, 16, 16)
    original = small_net(models_dir)
    pruned = load_pruned(small_net(models_dir), out / "pruned-model")
    assert macs(pruned, example) <= 0.5 * macs(original, example)
    assert macs(pruned, example) >= 0.4 * macs(original, example)
    assert "0.5 of the MACs kept" in (out / "report.md").read_text()


def test_target_macs_is_an_alias_of_macs(models_dir, tmp_path):
    done = run_cli("prune", "cli_models:small_net", "--input-shape", "1,3,16,16", "--criterion", "random",
                   "--selector", "knapsack", "--target-macs", "0.5", "--quiet", "--out", str(tmp_path / "o"),
                   cwd=models_dir)
    assert done.returncode == 0, done.stderr


BAD_SPECS = {
    "no colon": (["inspect", "cli_models"], "expected MODULE:FACTORY"),
    "module not found": (["inspect", "no_such_module:f"], "cannot import module 'no_such_module'"),
    "missing factory": (["inspect", "cli_models:nope"], "has no attribute 'nope'"),
    "not callable": (["inspect", "cli_models:NOT_CALLABLE"], "is not callable"),
    "factory raises": (["inspect", "cli_models:broken"], "cannot build"),
    "not a module": (["inspect", "cli_models:not_a_model"], "not a torch.nn.Module"),
    "malformed shape": (["inspect", "cli_models:small_net", "--input-shape", "1,3,x"], "expected positive integers"),
    "model fails on input": (["inspect", "cli_models:small_net", "--input-shape", "1,5,16,16"],
                             "failed on the example inputs"),
    "ratio out of range": (["prune", "cli_models:small_net", "--ratio", "1.5", "--out", "o"], "pruning_ratio"),
    "knapsack without target": (["prune", "cli_models:small_net", "--selector", "knapsack", "--out", "o"],
                                "needs --macs"),
    "uniform without ratio": (["prune", "cli_models:small_net", "--out", "o"], "needs --ratio"),
    "two budgets": (["prune", "cli_models:small_net", "--ratio", "0.5", "--macs", "0.5", "--out", "o"],
                    "give one budget"),
    "out is a file": (["prune", "cli_models:small_net", "--ratio", "0.5", "--out", "cli_models.py"],
                      "--out 'cli_models.py' cannot be a folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_gives_one_line_and_exit_code_2(case, models_dir):
    arguments, message = BAD_SPECS[case]
    if "--input-shape" not in arguments:
        arguments = [*arguments, "--input-shape", "1,3,16,16"]
    done = run_cli(*arguments, cwd=models_dir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pruning-ir: error:"), done.stderr
    assert message in lines[0]


def test_debug_shows_the_traceback(models_dir):
    done = run_cli("--debug", "inspect", "cli_models:broken", "--input-shape", "1,3,16,16", cwd=models_dir)
    assert done.returncode != 0 and "Traceback" in done.stderr and "cannot build" in done.stderr
