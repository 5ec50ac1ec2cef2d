#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes: full-size SD1.5- and SDXL-shaped UNet training steps
# (bf16, LoRA rank 16), gradient checkpointing on/off, torch.compile on/off; images/s, peak CUDA memory
# and the share of the card's measured bf16 GEMM rate, appended to benchmarks/RESULTS.md with the card's
# name (and copied to $OUT/gpu_check.md when $OUT is set, as on a lent device machine).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (torch, diffusers, peft, accelerate, transformers)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: tiny widths on the CPU, every code path once
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
args=("$@")
if [ -n "${OUT:-}" ] && [[ " $* " != *" --results "* ]]; then
    cp benchmarks/RESULTS.md "$OUT/gpu_check.md" 2>/dev/null || true
    args+=(--results "$OUT/gpu_check.md")
fi
export PYTHONUNBUFFERED=1
exec timeout 470 "$python" benchmarks/gpu_check.py "${args[@]}"
