"""``python -m pruning_ir.demo``: run the demo into ./demo-output (``pruning-ir demo`` has the options)."""

from .run import run_demo

if __name__ == "__main__":
    run_demo()
