"""The machine side of a measurement: its description, process memory, time limits, model
outputs, and fresh-process workers.

Memory is the peak resident set size (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs``) above the process's size just before the measured step: it counts
everything the step allocates (tensors, graphs, Python objects), unlike ``tracemalloc``,
which misses tensor storage.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from harness import HERE

THREADS = 1  # one intra-op thread: timings on a shared 2-core machine stay comparable


# -- process memory -----------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set size (Linux; a no-op where not allowed)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mb``: peak RSS above the start, MiB."""

    def __enter__(self) -> "PeakMemory":
        self.start = rss_mb()
        reset_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mb = max(rss_mb("VmHWM") - self.start, 0.0)


def cpu_seconds() -> float:
    """CPU time of this process and its finished subprocesses."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- models and outputs -------------------------------------------------------------------------
def tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def output_shapes(model: nn.Module, inputs: tuple) -> list[tuple]:
    with torch.no_grad():
        return [tuple(t.shape) for t in tensors(model(*inputs))]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20


def surrogate_loss(output: Any) -> torch.Tensor:
    """A scalar for calibration backward passes on any model: mean square of every output."""
    return sum(t.float().pow(2).mean() for t in tensors(output) if t.is_floating_point())


def short_error(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}"


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after ``seconds`` of wall time."""
    def expire(signum, frame):
        raise TimeoutError(f"did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def interleaved(libraries: tuple[str, ...], repeats: int) -> Iterator[str]:
    """ABBA order over repeats (A B, B A, A B, ...): linear drift hits every library alike."""
    for repeat in range(repeats):
        yield from (libraries if repeat % 2 == 0 else libraries[::-1])


# -- subprocess workers -------------------------------------------------------------------------------
def run_worker(module: str, args: list[str], timeout: float, fresh: bool = True) -> dict:
    """Run ``python benchmarks/<module>.py --worker ARGS`` in a fresh process; its last stdout
    line is a JSON object. A crash or a timeout comes back as ``{"error": ...}``. With
    ``fresh=False`` (quick smoke runs) ``<module>.worker(*ARGS)`` runs in this process instead:
    no interpreter start-up, but memory figures then include this process's caches."""
    if not fresh:
        try:
            with time_limit(timeout):
                return __import__(module).worker(*args)
        except Exception as error:  # noqa: BLE001
            return {"error": short_error(error)}
    command = [sys.executable, os.path.join(HERE, f"{module}.py"), "--worker", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"TimeoutError: worker did not finish within {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited with {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def worker_main(worker: Callable[..., dict]) -> bool:
    """If this process was started by :func:`run_worker`, run ``worker(*args)``, print its
    JSON and return True."""
    if "--worker" not in sys.argv:
        return False
    torch.set_num_threads(THREADS)
    args = sys.argv[sys.argv.index("--worker") + 1:]
    print(json.dumps(worker(*args)))
    return True


# -- the machine ---------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Machine, load, date and versions: what a reader needs to weigh the numbers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from pruning_ir.selectors.latency_table import cpu_model  # the key latency tables use, one copy
    return {"cpu": cpu_model(), "cores": cores, "load_average": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": THREADS,
            "torch_pruning": _version("torch-pruning"), "pruning_ir": _version("pruning-ir"),
            "transformers": _version("transformers")}
