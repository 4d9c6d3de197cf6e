#!/usr/bin/env bash
# GPU check, for a machine with CUDA (CI has none and skips it): tensor parallelism on a
# random-weight Llama-3-8B shape in bfloat16, TP1 vs TP2: decode step times and greedy identity.
# Under 5 minutes on one H200. With one GPU both TP2 ranks share it over gloo (a correctness check;
# the step time then says nothing about NCCL); with two or more, NCCL. Then pipeline stages on the
# GPU (stage processes sharing it, SmolLM2 in float32): PP2 vs PP1 decode through the real stack,
# which also measures the GPU's stage hop (the planner's `DeviceSpec.stage_hop_s`, 1 ms unmeasured).
#
#   bash benchmarks/gpu_check.sh            # prints the table; JSON in ${OUT:-/tmp}/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; skipping"
  exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"
timeout 280 "$PY" benchmarks/tp_decode.py --shape llama-3-8b --dtype bfloat16 --device cuda \
  --tp 1,2 --batch 16 --context 512 --steps 20 --json "${OUT:-/tmp}/gpu_check.json"
timeout 240 "$PY" benchmarks/pp_decode.py --runs 3 --batch 16 | tail -8
