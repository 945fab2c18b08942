"""Smoke test of the benchmark runner: ``benchmarks/run.py --quick`` into a temporary
directory writes every section's JSON and the report, and pruning_ir prunes every model of
the coverage section. No timing is asserted (a shared CI machine is too noisy for that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch_pruning")
pytest.importorskip("sklearn")
pytest.importorskip("transformers")

RUNNER = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run.py")
SECTIONS = ("coverage", "speed", "quality", "latency", "scale")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> str:
    results = str(tmp_path_factory.mktemp("bench"))
    done = subprocess.run([sys.executable, RUNNER, "--quick", "--results-dir", results],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return results


def _load(results: str, name: str) -> dict:
    with open(os.path.join(results, f"{name}_quick.json")) as handle:
        return json.load(handle)


def test_every_section_writes_its_json(quick_run):
    for name in SECTIONS:
        data = _load(quick_run, name)
        assert "error" not in data, data.get("error")
        assert data["quick"] is True and data["environment"]["cores"] >= 1
    assert _load(quick_run, "run")["failed"] == []


def test_report_has_every_section(quick_run):
    with open(os.path.join(quick_run, "RESULTS_quick.md")) as handle:
        text = handle.read()
    for heading in ("## Machine", "## 1. Coverage", "## 2. Speed", "## 3. Quality", "## 4. Latency budget",
                    "## 5. Scale", "## Where we lose / caveats"):
        assert heading in text


def test_pruning_ir_prunes_every_coverage_model(quick_run):
    coverage = _load(quick_run, "coverage")
    assert coverage["rows"], "no coverage rows"
    failed = {r["model"]: r["pruning_ir"]["error"] for r in coverage["rows"] if not r["pruning_ir"]["pruned"]}
    assert not failed
    assert coverage["summary"]["pruning_ir"] == coverage["summary"]["models"]


def test_sections_have_rows_for_both_libraries(quick_run):
    speed, scale, latency = _load(quick_run, "speed"), _load(quick_run, "scale"), _load(quick_run, "latency")
    for row in speed["rows"] + scale["rows"]:
        assert row["pruning_ir"]["error"] is None
        assert "torch_pruning" in row
    assert latency["targets"] and {r["method"] for r in latency["speedup"]} >= {"knapsack_macs", "tp_uniform"}
    assert _load(quick_run, "quality")["criteria"]["table"]


def test_quality_prunes_in_rounds_to_the_one_shot_budget(quick_run):
    """The criteria benchmark's rounds (``pruning_ir.prune_in_rounds``) run for every selection and
    end where one-shot selection does: uniform at its widths, global and knapsack within the MACs;
    Torch-Pruning's Taylor criterion runs in rounds too (uniform and global)."""
    rows = _load(quick_run, "quality")["criteria"]["rows"]
    rounds = [row for row in rows if row["criterion"].endswith("_x5")]
    assert {(row["selection"], row["criterion"]) for row in rounds} == {
        (selection, criterion) for selection in ("uniform", "global", "knapsack")
        for criterion in ("loss_aware_x5", "loss_aware_batch_x5", "loss_aware_mean_x5")} | {("uniform", "tp_taylor_x5"),
                                                                    ("global", "tp_taylor_x5")}
    for row in (row for row in rounds if row["criterion"].startswith("loss_aware")):
        one_shot = next(other for other in rows if other["criterion"] == "loss_aware_joint" and
                        (other["seed"], other["selection"], other["ratio"]) == (row["seed"], row["selection"],
                                                                                row["ratio"]))
        if row["selection"] == "uniform":
            assert row["widths"] == one_shot["widths"]
        else:
            assert row["macs"] <= row["budget"] * (1 + 1e-9)


def test_finetune_length_smoke(tmp_path):
    """benchmarks/finetune_length.py on one seed and one short fine-tune: every model of every
    ratio gets an accuracy per fine-tuning length, and --merge gives back the same table."""
    script = os.path.join(os.path.dirname(RUNNER), "finetune_length.py")
    path, merged = str(tmp_path / "run.json"), str(tmp_path / "merged.json")
    done = subprocess.run([sys.executable, script, "--seeds", "0", "--epochs", "1", "--finetunes", "1",
                           "--json", path], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.load(open(path))
    assert {(row["ratio"], row["model"]) for row in data["rows"]} == {
        (ratio, model) for ratio in (0.3, 0.5)
        for model in ("joint_uniform", "joint_global", "joint_knapsack", "tp_magnitude_global")}
    assert all(0.0 <= row["accuracy"]["1"] <= 1.0 and 0.0 <= row["bn"] <= 1.0 for row in data["rows"])
    done = subprocess.run([sys.executable, script, "--merge", path, "--json", merged],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.load(open(merged))["table"] == data["table"]


def test_gradual_smoke():
    """benchmarks/gradual.py --quick: the one-shot, rounds and gradual arms all land on the MACs
    target (0.3 of the unpruned MACs) with an accuracy each."""
    script = os.path.join(os.path.dirname(RUNNER), "gradual.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.split()[:1] == ["epochs"])
    assert header.split()[3:6] == ["one_shot", "rounds", "gradual"]
    row = next(line.split() for line in done.stdout.splitlines() if line.split()[:2] == ["2", "0"])
    accuracies, kept = [float(value) for value in row[3:6]], [float(value) for value in row[6:9]]
    assert all(0.1 < value <= 1.0 for value in accuracies)
    assert all(0.2 < value <= 0.3 + 1e-9 for value in kept)


def _run_criteria_script(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    """benchmarks/criteria.py at the 50% ratio only, with ``arguments``."""
    folder = os.path.dirname(RUNNER)
    code = f"import sys; sys.path.insert(0, {folder!r}); import criteria; criteria.RATIOS = (0.5,); criteria.main()"
    return subprocess.run([sys.executable, "-c", code, "--seeds", "0", "--epochs", "1", "--finetunes", "1",
                           *arguments], capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_criteria_runs_part_of_the_table_and_merges_it(tmp_path):
    """criteria.py --selections/--criteria runs only those rows; --merge puts two parts together
    and compares the LossAware one against the rivals of the other; tp_widths needs its reference."""
    parts = [str(tmp_path / "rivals.json"), str(tmp_path / "ours.json")]
    ours = ["loss_aware_joint", "loss_aware_joint_batch", "loss_aware_batch_measured"]
    for path, criteria in zip(parts, (["random", "magnitude"], ours)):
        done = _run_criteria_script(tmp_path, "--selections", "uniform", "--criteria", *criteria, "--json", path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = json.load(open(path))["rows"]
        assert {(row["selection"], row["criterion"]) for row in rows} == {
            ("-", "unpruned"), *(("uniform", name) for name in criteria)}
        unpruned = next(row for row in rows if row["criterion"] == "unpruned")
        assert len(unpruned["ft1_runs"]) == 1  # the unpruned model is fine-tuned like the pruned ones
    rows = {row["criterion"]: row for row in json.load(open(parts[1]))["rows"] if row["ratio"] == 0.5}
    measured, unmeasured = rows["loss_aware_batch_measured"], rows["loss_aware_joint_batch"]
    assert (measured["bn"], measured["ft1"]) == (unmeasured["bn"], unmeasured["ft1"])  # the same order in each group
    merged = str(tmp_path / "merged.json")
    done = _run_criteria_script(tmp_path, "--merge", *parts, "--json", merged)
    assert done.returncode == 0, done.stderr[-3000:]
    comparisons = json.load(open(merged))["comparisons"]
    assert {(c["criterion"], c["column"]) for c in comparisons} == {
        (name, column) for name in ours for column in ("bn", "ft1")}
    assert all(c["other"] in ("random", "magnitude") for c in comparisons)
    earlier = json.load(open(parts[1]))
    assert earlier["finetune_lr"] == 3e-4
    del earlier["finetune_lr"]  # a file of the earlier protocol, fine-tuned at 1e-3
    json.dump(earlier, open(tmp_path / "earlier.json", "w"))
    done = _run_criteria_script(tmp_path, "--merge", parts[0], str(tmp_path / "earlier.json"), "--json", merged)
    assert done.returncode == 2 and "finetune_lr" in done.stderr
    done = _run_criteria_script(tmp_path, "--selections", "tp_widths")
    assert done.returncode == 2 and "tp_widths takes its widths from tp_magnitude" in done.stderr
