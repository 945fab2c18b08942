"""Latency measured with a steady heap: large CPU buffers are reused, not page-faulted per call.

glibc's allocator maps a large activation afresh (and faults its pages in) on every call, or
not, depending on what the process freed before, so the same op reads several times slower
from one call to the next. ``measure_latency`` measures with ``steady_allocator`` by default.
Page faults are counted (``getrusage``), not timed: a deterministic measure of the effect.
The counts run in a subprocess whose glibc starts with a fixed 128 KiB mmap threshold, so
every large buffer is mapped per call until ``steady_allocator`` changes it (process-wide).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from pruning_ir import LatencyTable, TableLatency
from pruning_ir.latency import allocator_mode
from pruning_ir.selectors.latency_table import machine_key

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="steady_allocator tunes glibc's malloc")

# A 1x1 convolution whose output is 8 MiB (2048 pages): mapped per call unless the heap keeps it.
FAULTS = """
import resource, sys, torch
from torch import nn
from pruning_ir.latency import measure_latency, steady_allocator
torch.set_num_threads(1)
conv, x = nn.Conv2d(16, 64, 1, bias=False), torch.randn(8, 16, 64, 64)

def faults_per_call():
    # the fewest faults per call over five windows of ten calls: the heap may still grow (and
    # fault its new pages in) once, early; a buffer mapped per call faults in every window
    windows = []
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                conv(x)
            windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    return min(windows)

step = sys.argv[1]
if step == "measure_latency_steady":
    measure_latency(conv, x, warmup=1, repeats=1)
elif step == "measure_latency_process":
    measure_latency(conv, x, warmup=1, repeats=1, steady=False)
elif step == "steady_allocator":
    print("applied", steady_allocator())
print("faults", faults_per_call())
"""


def faults_per_call(step: str) -> float:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run([sys.executable, "-c", FAULTS, step], capture_output=True, text=True, env=environment,
                          timeout=120, check=True)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    if "applied" in lines:
        assert lines["applied"] == "True"
    return float(lines["faults"])


@glibc
def test_a_steady_heap_stops_faulting_large_buffers_in_on_every_call():
    mapped = faults_per_call("none")
    assert mapped > 1000   # most of the output's 2048 pages, every call
    assert faults_per_call("steady_allocator") < 0.05 * mapped


@glibc
def test_measure_latency_applies_it_unless_told_not_to():
    mapped = faults_per_call("measure_latency_process")
    assert mapped > 1000
    assert faults_per_call("measure_latency_steady") < 0.05 * mapped


def test_the_table_key_says_which_memory_its_timings_ran_with():
    steady, process = machine_key("cpu", 1, steady=True), machine_key("cpu", 1, steady=False)
    assert process.endswith("memory=process")
    assert steady != process or allocator_mode("cpu", True) == "process"   # no glibc: nothing to steady
    assert allocator_mode("cuda", True) == allocator_mode("cuda", False) == "device"
    x = torch.randn(1, 3, 8, 8)
    assert LatencyTable.from_function(TableLatency(x, threads=1, steady=False)).machine == process
    table = LatencyTable.from_function(TableLatency(x, threads=1))
    assert table.steady and table.machine == steady


def test_a_table_built_without_it_times_ops_without_it(tmp_path):
    """Timings from one memory mode are never read back under the other (the disk cache is keyed)."""
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "timings.json"
    table = LatencyTable(x, threads=1, steady=False, cache_path=path)
    signature = table.module_signature(nn.Conv2d(3, 8, 3), (1, 3, 8, 8))
    table.latency(signature)
    table.save()
    assert len(LatencyTable(x, threads=1, steady=False, cache_path=path)) == 1
    assert len(LatencyTable(x, threads=1, cache_path=path)) == (0 if allocator_mode("cpu", True) == "steady" else 1)

