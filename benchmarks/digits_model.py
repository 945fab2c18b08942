"""The digits task for the benchmarks: re-exported from :mod:`pruning_ir.digits` (one copy of the code).

scikit-learn's digits (real 8x8 handwritten digits shipped with the package), a small
residual CNN for them, and train / evaluate / batch-norm re-estimation helpers.
"""

from pruning_ir.demo.digits import (BasicBlock, DigitsResNet, accuracy, batches, build_model, digits_data,  # noqa: F401
                                    reestimate_batchnorm, train)
