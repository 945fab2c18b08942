"""The demo (``make demo`` / ``pruning-ir demo``): a small residual CNN trained on scikit-learn's
digits, pruned to half its MACs, with a report.

Kept out of the core package because it needs scikit-learn (the data) and matplotlib (the
chart): ``pip install 'pruning-ir[demo]'``. Both are imported only when used.
"""

from .run import run_demo

__all__ = ["run_demo"]
