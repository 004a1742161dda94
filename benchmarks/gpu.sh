#!/usr/bin/env bash
# The GPU recipe: cost of AdamW / SAM / XSAM in bf16 on one GPU, MiniLM and a small ViT, in well under 5 minutes.
# Usage (from the repository root, on a machine with a CUDA GPU and the project installed):
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python benchmarks/cost.py --model minilm --device cuda --bf16 --batch_size 16 --seq_len 64 --rounds 5 --steps 10 \
    --memory --json "$out/cost_minilm_gpu.json" | tee "$out/cost_minilm_gpu.txt"
python benchmarks/cost.py --model vit --device cuda --bf16 --batch_size 64 --rounds 5 --steps 10 \
    --memory --json "$out/cost_vit_gpu.json" | tee "$out/cost_vit_gpu.txt"
