#!/usr/bin/env bash
# GPU checks of pyro-perturb, one prepared script for a CUDA machine (about 5 minutes on
# one H200; every step has its own time limit, 7.5 minutes in all):
#
#   1. the device tests on cuda (PYRO_PERTURB_TEST_DEVICE=cuda, see tests/devices.py): the
#      default-device checks of the model families, the evaluation and the model effects,
#      and the zoo contract (every registered model trains, saves, loads, predicts and is
#      scored on the GPU);
#   2. bench/gpu_check.py --device cuda: training throughput (cells/s at the registry
#      settings), the model ATE at 700 treatments x 2,500 particles x 1,187 genes (seconds,
#      torch.cuda.max_memory_allocated, the treatment batch for a 1,024 MB budget) per
#      estimator, and the CUDA ATE against the CPU's within Monte Carlo error.
#
# Figures go to $OUT (bench/results/gpu/ when OUT is unset): gpu_info.txt,
# device_tests.txt and .xml, gpu_check.md and .json, gpu_check.log. Exit status 0 when
# every step passed. Usage: bash bench/gpu_check.sh   (PYTHON=... to choose the interpreter)
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$ROOT/bench/results/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0
start=$(date +%s)

{
    nvidia-smi || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0))"
} > "$OUT_DIR/gpu_info.txt" 2>&1 || { echo "no usable CUDA device (see $OUT_DIR/gpu_info.txt)"; exit 1; }

echo "[1/2] device tests on cuda"
PYRO_PERTURB_TEST_DEVICE=cuda OMP_NUM_THREADS=4 timeout 200 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_zoo_contract.py tests/test_sams_vae.py tests/test_fcr.py tests/test_engine.py tests/test_ate.py \
    tests/test_effects.py -k "device_clean or test_contract" --junitxml="$OUT_DIR/device_tests.xml" \
    > "$OUT_DIR/device_tests.txt" 2>&1 || status=1
tail -n 3 "$OUT_DIR/device_tests.txt"

echo "[2/2] throughput, ATE at scale, CUDA vs CPU"
OMP_NUM_THREADS=4 timeout 240 "$PY" bench/gpu_check.py --device cuda --threads 4 --out "$OUT_DIR" \
    > "$OUT_DIR/gpu_check.log" 2>&1 || status=1
tail -n 5 "$OUT_DIR/gpu_check.log"

echo "done in $(( $(date +%s) - start )) s, status $status; figures in $OUT_DIR"
exit $status
