"""Quality: accuracy of the pruned digits CNN, pruning_ir's criteria and selectors vs
Torch-Pruning's Taylor and magnitude importance (local and global), by ``criteria.py``.

``criteria.py`` (run as a subprocess with its command line, so that it stays the one place
this comparison is defined) trains the CNN on scikit-learn's digits per seed, prunes it at
30/50/70% and reports test accuracy right after pruning, after batch-norm re-estimation and
after one epoch of fine-tuning (one run here); Torch-Pruning is matched to the MACs of the
LossAware model.
Its JSON is stored whole under ``criteria``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from bench_common import HERE

SEEDS = (0, 1)
QUICK_SEEDS = (0,)
FINETUNES = 1      # fine-tuning runs per model (criteria.py's own default, 3, would not fit the bench's 30 minutes)
QUICK_EPOCHS = 3   # training epochs of the unpruned model in quick mode (smoke test only)
# quick mode: one ratio and large calibration batches (a smoke test, not a measurement)
QUICK_PATCH = "criteria.RATIOS = (0.5,); criteria.CALIBRATION_BATCH = 128"


def run(quick: bool = False, seeds: tuple[int, ...] | None = None) -> dict:
    seeds = seeds or (QUICK_SEEDS if quick else SEEDS)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "criteria.json")
        script = [os.path.join(HERE, "criteria.py")]
        if quick:
            script = ["-c", f"import sys; sys.path.insert(0, {HERE!r}); import criteria; {QUICK_PATCH}; "
                            "criteria.main()"]
        command = [sys.executable, *script, "--seeds", *map(str, seeds), "--budget", "macs",
                   "--finetunes", str(FINETUNES), "--json", path]
        if quick:
            command += ["--epochs", str(QUICK_EPOCHS)]
        done = subprocess.run(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3600)
        print("\n".join("  " + line for line in done.stdout.splitlines()[-12:]), flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"criteria.py exited with {done.returncode}: {done.stdout.strip()[-300:]}")
        with open(path) as handle:
            criteria = json.load(handle)
    arguments = command[command.index("--seeds"):command.index("--json")] + command[command.index(path) + 1:]
    return {"settings": {"seeds": list(seeds), "command": " ".join(["python benchmarks/criteria.py", *arguments]),
                         "patched": QUICK_PATCH if quick else None}, "criteria": criteria}
