#!/usr/bin/env bash
# The GPU checks, in one command for a machine with CUDA: the suite's CUDA tests, then the
# GPU latency benchmark (benchmarks/latency_gpu.py -> RESULTS.md section 4d).
#
#   bash benchmarks/gpu_checks.sh prepare   # here, with a network: the wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu_checks.sh           # there, from the repository root (carry .whl); logs and results
#                                           # go to $OUT (default /tmp/gpu-checks)
# The GPU image has torch but not ortools, dill or torch-pruning; they travel as wheels for its
# Python 3.12, installed into /tmp/site. BENCH_BUDGET_S: no benchmark setting starts after it.
set -u -o pipefail
WHEELS=(ortools==9.15.6755 "protobuf>=6.33.1,<6.34" immutabledict dill==0.4.1 torch-pruning==1.6.1)

if [ "${1:-}" = "prepare" ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.csv" 2>&1

status=0
python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/test_ir_api.py::test_cuda_model_is_traced_and_pruned_on_cuda \
    tests/test_latency.py::test_measure_latency_on_cuda_leaves_the_model_on_cpu \
    tests/test_measured_costs.py::test_measures_on_cuda \
    tests/test_one_call.py::test_a_model_on_cuda_is_pruned_on_cuda \
    tests/test_optimizer_state.py::test_the_carried_state_stays_on_the_model_device \
    tests/test_reconstruction.py::test_cuda_statistics_and_refit_stay_on_the_device \
    tests/test_rounds.py::test_rounds_stay_on_the_model_device \
    tests/test_sequential_refit.py::test_cuda_sequential_refit_stays_on_the_device_and_exact \
    tests/test_latency_table.py 2>&1 | tee "$OUT/cuda_tests.log" || status=1

(cd benchmarks && python3 latency_gpu.py --budget-s "${BENCH_BUDGET_S:-330}") 2>&1 | tee "$OUT/latency_gpu.log" \
    || status=1
cp benchmarks/results/latency_gpu.json benchmarks/RESULTS.md "$OUT/" 2>/dev/null
exit $status
