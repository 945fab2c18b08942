"""Smoke test of the benchmarks: ``benchmarks/run.py --quick`` into a temporary directory writes
every section's JSON and the report, pruning_ir prunes every model of the coverage section, and
the quality section runs the documented arms; ``criteria.py`` runs and merges parts of its table,
``gradual.py`` lands its arms on the MACs target, and regenerating RESULTS.md keeps its hand-written
sections. No timing is asserted (a shared CI machine is too noisy for that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch_pruning")
pytest.importorskip("sklearn")
pytest.importorskip("transformers")

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
RUNNER = os.path.join(BENCHMARKS, "run.py")
SECTIONS = ("coverage", "speed", "quality", "latency", "scale")
ONE_SHOT = ("loss_aware_joint", "loss_aware_joint_batch", "loss_aware_batch_measured", "magnitude", "magnitude_bn",
            "random", "tp_taylor", "tp_magnitude")
IN_ROUNDS = ("loss_aware_x5", "loss_aware_batch_x5", "tp_taylor_x5")


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
                    "## 5. Scale", "## Where we lose / caveats", "## Retired arms"):
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


def test_quality_runs_the_documented_arms(quick_run):
    """Every arm under uniform and global selection, ours alone under knapsack selection."""
    rows = _load(quick_run, "quality")["criteria"]["rows"]
    ours = [name for name in ONE_SHOT + IN_ROUNDS if name.startswith("loss_aware")]
    assert {(row["selection"], row["criterion"]) for row in rows} == {("-", "unpruned")} | {
        (selection, name) for selection in ("uniform", "global") for name in ONE_SHOT + IN_ROUNDS} | {
        ("knapsack", name) for name in ours}


def test_quality_prunes_in_rounds_to_the_one_shot_budget(quick_run):
    """The criteria benchmark's rounds (``pruning_ir.prune_in_rounds``) end where one-shot selection
    does: uniform at its widths, global and knapsack within the MACs budget."""
    rows = _load(quick_run, "quality")["criteria"]["rows"]
    for row in (row for row in rows if row["criterion"] in ("loss_aware_x5", "loss_aware_batch_x5")):
        one_shot = next(other for other in rows if other["criterion"] == "loss_aware_joint" and
                        (other["seed"], other["selection"], other["ratio"]) == (row["seed"], row["selection"],
                                                                                row["ratio"]))
        if row["selection"] == "uniform":
            assert row["widths"] == one_shot["widths"]
        else:
            assert row["macs"] <= row["budget"] * (1 + 1e-9)


def test_gradual_smoke():
    """benchmarks/gradual.py --quick: the one-shot, rounds and gradual arms all land on the MACs
    target (0.3 of the unpruned MACs) with an accuracy each."""
    script = os.path.join(BENCHMARKS, "gradual.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.split()[:1] == ["epochs"])
    assert header.split()[3:6] == ["one_shot", "rounds", "gradual"]
    row = next(line.split() for line in done.stdout.splitlines() if line.split()[:2] == ["2", "0"])
    accuracies, kept = [float(value) for value in row[3:6]], [float(value) for value in row[6:9]]
    assert all(0.1 < value <= 1.0 for value in accuracies)
    assert all(0.2 < value <= 0.3 + 1e-9 for value in kept)


def test_perplexity_smoke():
    """benchmarks/perplexity.py --quick: every recipe removes its share of the attention and MLP parameters
    (within a few points; Torch-Pruning's ratio is bisected) and gets a finite perplexity."""
    script = os.path.join(BENCHMARKS, "perplexity.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    methods = {row["method"] for row in rows}
    assert {"loss_aware", "wanda", "wanda_query_heads", "flap", "torch_pruning", "flap+bias", "wanda+least_squares",
            "wanda_hidden+least_squares"} <= methods
    for row in rows:
        assert abs(row["removed"] - row["share"]) < 0.05, row
        assert 1.0 < row["perplexity"] < float("inf")
        if "refit" in row:  # every consumer that lost inputs is refit: down_proj of the 2 layers, o_proj where
            assert row["skipped"] == {}, row  # heads went (4 in the quick model), with the hidden size more
            lost = 2 * (1 + (row["heads"] < 4))
            assert row["refit"] == lost if "_hidden" not in row["method"] else row["refit"] > lost, row
    assert all(row["statistics_mb"] > 0 for row in rows if "+" in row["method"] and "rounds" not in row["method"])


def _run_criteria_script(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    """benchmarks/criteria.py --quick (the 50% ratio only), one seed, with ``arguments``."""
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, "criteria.py"), "--quick", "--seeds", "0",
                           "--epochs", "1", "--finetunes", "1", *arguments],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_criteria_runs_part_of_the_table_and_merges_it(tmp_path):
    """criteria.py --selections/--criteria runs only those rows; --merge puts two parts together
    and compares the LossAware one against the rivals of the other, and refuses files fine-tuned
    at other rates."""
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


def test_regenerated_report_keeps_hand_written_sections(tmp_path, monkeypatch):
    """RESULTS.md is regenerated whole, except for sections written by hand, which are carried over."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    from harness import report
    out = tmp_path / "RESULTS.md"
    out.write_text("# old\n\n## Machine\n\nstale\n\n## Earlier results\n\nkept by hand\n\n### A study\n\nalso kept\n")
    report.write(str(tmp_path), out=str(out))
    text = out.read_text()
    assert "stale" not in text and "## Retired arms" in text
    assert text.index("## Retired arms") < text.index("## Earlier results\n\nkept by hand\n\n### A study\n\nalso kept")
    report.write(str(tmp_path), out=str(out))
    assert out.read_text() == text  # regenerating again changes nothing
