"""The harness every benchmark script shares, so that each script holds only its comparison.

* ``machine``: the machine's description, process memory, time limits, subprocess workers;
* ``rival``: Torch-Pruning set up the usual way (MetaPruner, its ratio bisected to a MACs budget);
* ``digits``: the digits task (data, the residual CNN, training, calibration, evaluation);
* ``models``: benchmark-scale models (the test zoo's architectures at realistic sizes);
* ``tables``: tables over seeds and JSON files; ``report``: ``RESULTS.md`` from the JSON files.

Importing it puts the repository root (``pruning_ir``) and ``tests/`` (the model zoo) on ``sys.path``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
for _path in (os.path.join(REPO, "tests"), REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)
