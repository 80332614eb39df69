#!/usr/bin/env bash
# The GPU benchmarks behind docs/BENCHMARKS.md for distillation, multi-GPU scaling and pruning, on a host with 2
# GPUs:
#   GPU 0: bench_distill.py: SmolLM2 pruned by 25%, distilled for TOKENS, then modelopt.torch.distill at the
#          same tokens, data, sample order, optimizer and schedule;
#   GPU 1, meanwhile: bench_prune.py: every mix and importance at 10/25/40% fewer parameters, and torch-pruning;
#   then both GPUs: bench_distill.py --scaling 1,2: the same distillation at SCALING_TOKENS on 1 and 2 GPUs.
# Usage: bash bench/run_gpu.sh RESULTS_DIR   (dscompress, modelopt and torch-pruning importable by $PYTHON)
set -uo pipefail
R=${1:?results dir}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1
W=${WORK:-/tmp/bench-work}
PY=${PYTHON:-python3}
CUDA_VISIBLE_DEVICES=0 $PY bench/bench_distill.py --tokens "${TOKENS:-20000000}" --peer-python --work "$W/distill" \
  --out "$R/distill_gpu.json" > "$R/distill.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $PY bench/bench_prune.py --device cuda --peer-python --work "$W/prune" \
  --out "$R/prune_gpu.json" > "$R/prune.log" 2>&1 &
wait
$PY bench/bench_distill.py --scaling 1,2 --tokens "${SCALING_TOKENS:-4000000}" --no-peer --work "$W/distill" \
  --out "$R/distill_scaling.json" > "$R/scaling.log" 2>&1
echo done > "$R/DONE"
