"""Train a ViT for image classification with XSAM (Chen & Zhou, ICLR 2026), offline by default.

    python examples/image_classification.py                                 # a small ViT on scikit-learn's digits
    python examples/image_classification.py --optim sam                     # or adamw_torch, or any built-in optimizer
    python examples/image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name cifar10                                              # with network
    python examples/image_classification.py --dataset_name imagefolder --data_dir path/to/folder
    python examples/image_classification.py --label_noise 0.2               # 20% of training labels flipped
    accelerate launch examples/image_classification.py                      # several processes, unchanged

With no arguments it builds a small ViT from a config (8x8 RGB input, 4x4 patches, 2 layers) and trains it on the 1,797
8x8 digits of scikit-learn, split deterministically into train, validation and test, then ends like the text
example: a results table, the saved model and image processor, and a model card naming XSAM and its
hyperparameters. Every `XSAMTrainingArguments` flag works. With --dataset_name the defaults become 3 epochs, and
with --model_name_or_path the learning rate becomes 5e-5 (flags given on the command line always win); the
config-built ViT takes larger images with e.g. --image_size 32 --patch_size 4.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from _common import (
    CommonDataArguments,
    Examples,
    LabelledData,
    check_num_labels,
    compute_metrics,
    finish,
    is_image_feature,
    load_hub_dataset,
    parse_args,
    split_three_ways,
)
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    set_seed,
)

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

# About 15 seconds on 2 CPU cores; a ViT trained from scratch wants a larger learning rate than fine-tuning.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/image_classification",
    optim="xsam",
    xsam_rho=0.05,
    xsam_probe_every=50,
    learning_rate=2e-3,
    weight_decay=0.01,
    max_steps=300,
    warmup_steps=0.1,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    logging_steps=50,
    save_strategy="no",
    report_to="none",
    remove_unused_columns=False,  # our dataset already yields only pixel_values and labels
    seed=42,
)

# Beyond the built-in data and model, the usual fine-tuning recipe (flags on the command line still win): epochs
# rather than 300 steps, and a fine-tuning learning rate for a pretrained checkpoint.
OVERRIDES = (
    ("dataset_name", dict(max_steps=-1, num_train_epochs=3)),
    ("model_name_or_path", dict(learning_rate=5e-5)),
)

IMAGE_COLUMNS = ("image", "img", "picture")


@dataclass
class ModelArguments:
    """Which model to train.

    Parameters:
        model_name_or_path (None): a checkpoint folder or Hub id; None = a small ViT built from a config (below),
            with its `ViTImageProcessor`, offline.
        image_size (8), patch_size (4), hidden_size (64), num_hidden_layers (2): the config-built ViT.
        num_labels (None): must match the data when given; None takes it from the data.
        ignore_mismatched_sizes (False): let a checkpoint's classification head be replaced by one of the data's size.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint folder or Hub id (default: a small ViT built from a config)."}
    )
    image_size: int = field(default=8, metadata={"help": "Config-built ViT: input height and width in pixels."})
    patch_size: int = field(default=4, metadata={"help": "Config-built ViT: patch height and width."})
    hidden_size: int = field(default=64, metadata={"help": "Config-built ViT: hidden size."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Config-built ViT: number of layers."})
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of labels; must match the data (default: taken from the data)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a checkpoint's classification head of another size."}
    )

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")


@dataclass
class DataArguments(CommonDataArguments):
    """The data (see `CommonDataArguments` for the splits and subsets).

    Parameters:
        builtin_dataset ("digits"): scikit-learn's 8x8 digits (10 classes).
        image_column_name (None): image column of a --dataset_name dataset; None = its first column of images.
    """

    builtin_dataset: str | None = field(
        default="digits", metadata={"help": "Offline dataset when --dataset_name is unset: 'digits' (scikit-learn)."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column of --dataset_name (default: its first column of images)."}
    )

    builtin_choices = ("digits",)


# ---------------------------------------------------------------------- the data
def load_digits_data(data_args: DataArguments) -> LabelledData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels to 8-bit RGB, the form every image processor takes.
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    splits = split_three_ways(Examples(images, [int(y) for y in digits.target]), data_args)
    return LabelledData(splits, [str(n) for n in digits.target_names], "scikit-learn digits (8x8)")


def image_columns(data_args: DataArguments):
    """The input-column finder for `load_hub_dataset`: the given image column, or the first column of images."""

    def find(features) -> list[str]:
        name = data_args.dataset_name
        column = data_args.image_column_name
        if column is not None:
            if column not in features:
                raise ValueError(
                    f"image_column_name={column!r} is not a column of {name}; its columns are {', '.join(features)}"
                )
            if not is_image_feature(features[column]):
                raise ValueError(f"image_column_name={column!r} of {name} holds {features[column]}, not images")
            return [column]
        found = [c for c, f in features.items() if is_image_feature(f)]
        found += [c for c in IMAGE_COLUMNS if c in features and c not in found]
        if not found:
            raise ValueError(
                f"{name} has no images: none of its columns ({', '.join(features)}) is an Image feature or named "
                f"{' / '.join(IMAGE_COLUMNS)}. Use an image dataset, or pass --image_column_name."
            )
        return found[:1]

    return find


class ImageDataset(torch.utils.data.Dataset):
    """Examples run through the image processor one at a time, on access (images decode lazily)."""

    def __init__(self, examples: Examples, processor):
        self.examples, self.processor = examples, processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        image = self.examples.inputs[i]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        pixel_values = self.processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, "labels": self.examples.labels[i]}


def build_vit(model_args: ModelArguments, data: LabelledData):
    """The default model: a small ViT from a config, and an image processor that resizes to its input size."""
    config = ViTConfig(
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        num_channels=3,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=4,
        intermediate_size=2 * model_args.hidden_size,
        hidden_dropout_prob=0.1,
        num_labels=data.num_labels,
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
    )
    processor = ViTImageProcessor(
        size={"height": model_args.image_size, "width": model_args.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ViTForImageClassification(config), processor


# ---------------------------------------------------------------------- the run
def main(argv: Sequence[str] | None = None, callbacks: list | None = None) -> dict:
    """Run the example on `argv` (the command line by default); `callbacks` go to the trainer (the benchmarks
    use them to look at the weights during training). Returns the results that `results.json` holds."""
    started = time.perf_counter()
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, XSAMTrainingArguments), TRAINING_DEFAULTS, argv, OVERRIDES
    )
    if data_args.dataset_name:
        data = load_hub_dataset(data_args, image_columns(data_args))
    else:
        data = load_digits_data(data_args)
    check_num_labels(model_args.num_labels, data)
    data = data.prepare(data_args)  # subsets, then any --label_noise on the training split
    if training_args.should_log:
        print(data.summary())
        label, accuracy = data.majority_baseline()
        print(f"Majority class: {label!r}, test accuracy {accuracy:.4f}")

    set_seed(training_args.seed)  # the initial weights
    if model_args.model_name_or_path is None:
        model, processor = build_vit(model_args, data)
    else:
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=data.num_labels,
            id2label=dict(enumerate(data.label_names)),
            label2id={name: i for i, name in enumerate(data.label_names)},
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            dtype=torch.float32,  # float32 master weights (XSAM's norms want them); --bf16/--fp16 for mixed precision
        )
    # The classification head averages over its micro-batch and ignores num_items_in_batch, though its forward takes
    # **kwargs: let the Trainer divide by the accumulation steps (for every --optim alike), so that accumulation and
    # processes train like one batch.
    model.accepts_loss_kwargs = False
    sets = {split: ImageDataset(examples, processor) for split, examples in data.splits.items()}

    trainer = XSAMTrainer(
        model=model,
        args=training_args,
        train_dataset=sets["train"],
        eval_dataset=sets["validation"],
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    train_result = trainer.train()
    card = dict(tasks="image-classification", finetuned_from=model_args.model_name_or_path)
    return finish(trainer, training_args, data, sets, train_result, started, card, data_args)


if __name__ == "__main__":
    main(sys.argv[1:])
