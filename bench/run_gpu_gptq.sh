#!/usr/bin/env bash
# GPTQ on 1 vs 2 GPUs of one host (docs/BENCHMARKS.md, issue #9): bench_gptq_multi.py on
#   qwen:    random weights in Qwen2.5-7B's shape (15.2 GB bf16), 64 x 512 random-token windows, group 128;
#   moe:     random weights in Qwen3-30B-A3B's layer shape (128 experts), 8 of its 48 layers (5.6 B parameters, 11 GB bf16);
#   smollm2: the bundled SmolLM2 (real weights, fp32), 64 x 512 pydoc windows, group 64, with perplexity,
#            and a second 1-GPU run with batch_size 4 (the noise floor of float summation order).
# Usage: bash bench/run_gpu_gptq.sh RESULTS_DIR qwen|moe|smollm2   (dscompress importable by $PYTHON)
set -euo pipefail
R=${1:?results dir}
WHAT=${2:?qwen or smollm2}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ "$WHAT" = qwen ]; then
  $PY bench/bench_gptq_multi.py --model qwen2.5-7b --devices 1,2 --samples 64 --seq-len 512 --group-size 128 \
    --out "$R/gptq_multi_qwen7b.json"
elif [ "$WHAT" = moe ]; then
  $PY bench/bench_gptq_multi.py --model qwen3-moe-30b-a3b-8l --devices 1,2 --samples 64 --seq-len 512 \
    --group-size 128 --out "$R/gptq_multi_qwen3moe.json"
else
  $PY bench/bench_gptq_multi.py --model bundled:smollm2-135m-instruct --devices 1,2 --samples 64 --seq-len 512 \
    --group-size 64 --dtype float32 --noise-floor --out "$R/gptq_multi_smollm2.json"
fi
