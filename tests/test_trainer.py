"""XSAMTrainer: equivalences with Trainer and hand-written SAM, accumulation, resume, dropout, BatchNorm, logging."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    assert_params_equal,
    hand_written_sam,
    image_data,
    like_one_batch,
    make_args,
    max_change,
    params_of,
    text_data,
    tiny_bert,
    tiny_resnet,
    tiny_vit,
    train,
)
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_xsam import XSAM, XSAMTrainer


class SequentialXSAMTrainer(XSAMTrainer):
    """Visits the data in order, so a hand-written loop can see the same micro-batches."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


@pytest.mark.parametrize("kind", ["bert", "vit", "resnet"])
def test_xsam_changes_parameters_of_tiny_models(tmp_path, kind):
    model, data = {"bert": (tiny_bert(), text_data()), "vit": (tiny_vit(), image_data()),
                   "resnet": (tiny_resnet(), image_data())}[kind]
    before = params_of(model)
    trainer = train(model, tmp_path, data, optim="xsam", xsam_probe_every=2, max_steps=3)
    assert max_change(before, model) > 1e-5
    assert trainer.xsam.step_count == 3
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


def test_rho_zero_equals_trainer_with_the_base_optimizer(tmp_path):
    reference = tiny_bert()
    train(reference, tmp_path / "ref", trainer_cls=Trainer, optim="adamw_torch", max_steps=4)
    model = tiny_bert()
    train(model, tmp_path / "xsam", optim="xsam", xsam_rho=0.0, xsam_base_optim="adamw_torch", max_steps=4)
    assert_params_equal(params_of(reference), params_of(model))


def test_rho_zero_with_accumulation_follows_the_trainers_own_loss_scaling(tmp_path):
    """``loss_is_scaled_for_ga = False`` (the Trainer's switch for a loss that is a per-batch mean) is honoured by
    every pass: at rho 0 the run equals the plain Trainer's with the same switch, bitwise."""
    class ScaledTrainer(Trainer):
        loss_is_scaled_for_ga = False  # BERT ignores num_items_in_batch: make Trainer divide by the steps

    class ScaledXSAMTrainer(XSAMTrainer):
        loss_is_scaled_for_ga = False

    reference = tiny_bert()
    train(reference, tmp_path / "ref", trainer_cls=ScaledTrainer, optim="sgd", learning_rate=0.5,
          gradient_accumulation_steps=2, max_steps=3)
    model = tiny_bert()
    train(model, tmp_path / "xsam", trainer_cls=ScaledXSAMTrainer, optim="sam", xsam_rho=0.0, xsam_base_optim="sgd",
          learning_rate=0.5, gradient_accumulation_steps=2, max_steps=3)
    assert_params_equal(params_of(reference), params_of(model))


def test_builtin_optim_is_exactly_trainer(tmp_path):
    reference = tiny_bert()
    train(reference, tmp_path / "ref", trainer_cls=Trainer, optim="adamw_torch", gradient_accumulation_steps=2)
    model = tiny_bert()
    trainer = train(model, tmp_path / "ours", optim="adamw_torch", gradient_accumulation_steps=2)
    assert_params_equal(params_of(reference), params_of(model))
    assert not isinstance(trainer.optimizer.optimizer, XSAM)


@pytest.mark.parametrize(("accumulation", "perturbation"), [(1, "global"), (2, "global"), (2, "local")])
def test_sam_with_sgd_equals_hand_written_sam(tmp_path, accumulation, perturbation):
    """global: the step's whole batch (micro-batches of 4 x accumulation) ascends as one; local: each micro-batch
    along its own gradient (m-sharpness), the directions averaged."""
    data = text_data(n=24)
    reference = tiny_bert(dropout=0.0)
    hand_written_sam(reference, data, rho=0.2, lr=0.5, batch_size=4 * accumulation, steps=3, max_grad_norm=0.3,
                      micro_batch=4 if perturbation == "local" else None)
    model = tiny_bert(dropout=0.0)
    trainer = SequentialXSAMTrainer(
        model=model, train_dataset=data,
        args=make_args(tmp_path, optim="sam", xsam_rho=0.2, xsam_base_optim="sgd", learning_rate=0.5,
                       lr_scheduler_type="constant", gradient_accumulation_steps=accumulation, max_steps=3,
                       max_grad_norm=0.3, weight_decay=0.0, xsam_perturbation=perturbation),
    )
    trainer.train()
    expected, actual = params_of(reference), params_of(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max_change(params_of(tiny_bert(dropout=0.0)), model) > 1e-3


def test_local_accumulation_gives_the_mean_of_micro_batch_directions_not_the_sum(tmp_path):
    # One step, two micro-batches, SGD lr 1: the update is exactly -(d1 + d2) / 2.
    data = text_data(n=8)
    model = like_one_batch(tiny_bert(dropout=0.0))  # the Trainer divides each micro-batch's mean loss by 2
    before = params_of(model)
    SequentialXSAMTrainer(
        model=model, train_dataset=data,
        args=make_args(tmp_path, optim="sam", xsam_rho=0.1, xsam_base_optim="sgd", learning_rate=1.0,
                       lr_scheduler_type="constant", gradient_accumulation_steps=2, max_steps=1,
                       max_grad_norm=0.0, weight_decay=0.0, xsam_perturbation="local"),
    ).train()
    single = []
    for half in (data[:4], data[4:]):
        probe = tiny_bert(dropout=0.0)
        hand_written_sam(probe, half, rho=0.1, lr=1.0, batch_size=4, steps=1, max_grad_norm=1e9)
        single.append({n: before[n] - p.detach() for n, p in probe.named_parameters()})  # = d_i
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), (single[0][name] + single[1][name]) / 2,
                                   rtol=1e-5, atol=1e-6)


def test_resume_equals_uninterrupted_run_bitwise(tmp_path):
    settings = dict(optim="xsam", xsam_rho=0.2, xsam_probe_every=2, gradient_accumulation_steps=2,
                    max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1)
    full = tiny_bert(dropout=0.1)
    full_trainer = train(full, tmp_path / "full", **settings)
    resumed = tiny_bert(seed=123, dropout=0.1)  # weights come from the checkpoint
    trainer = XSAMTrainer(model=resumed, args=make_args(tmp_path / "full", **settings), train_dataset=text_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert_params_equal(params_of(full), params_of(resumed))
    assert trainer.xsam.alpha == full_trainer.xsam.alpha
    assert trainer.xsam.step_count == full_trainer.xsam.step_count == 6

    def probes(t):
        return [(h["step"], h["xsam/probe_losses"]) for h in t.state.log_history if "xsam/probe_losses" in h]

    assert [s for s, _ in probes(full_trainer)] == [1, 3, 5]
    assert probes(trainer)[-1] == probes(full_trainer)[-1]


class NoisyClassifier(nn.Module):
    """Records the dropout mask of every forward, to check which passes share randomness."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 3)
        self.dropout = nn.Dropout(0.5)
        self.masks: list[torch.Tensor] = []

    def forward(self, input_ids, labels=None):
        hidden = self.dropout(self.embed(input_ids).mean(1))
        self.masks.append((hidden != 0).detach().clone())
        logits = self.head(hidden)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("perturbation", ["global", "local"])
def test_every_pass_of_a_micro_batch_sees_the_same_dropout_masks(tmp_path, perturbation):
    model = NoisyClassifier()
    train(model, tmp_path, optim="xsam", xsam_probe_every=2, xsam_ascent_steps=2, gradient_accumulation_steps=2,
          max_steps=2, xsam_perturbation=perturbation)
    # micro-batches a, b (step 0, probed) and c, d (step 1), each pass labelled with its micro-batch
    if perturbation == "global":  # theta_0 passes as they come, then every pass set over the whole window
        order = list("ab") + list("ab") * 2 + list("ab") * 21 + list("cd") + list("cd") * 2
    else:  # each micro-batch's passes at once; the probe on the step's first micro-batch
        order = list("a" * 24 + "b" * 3 + "c" * 3 + "d" * 3)
    assert len(model.masks) == len(order)
    first = {}
    for label, mask in zip(order, model.masks):
        first.setdefault(label, mask)
        assert torch.equal(mask, first[label]), label
    assert len({tuple(m.flatten().tolist()) for m in first.values()}) == 4  # each micro-batch its own masks


def test_batchnorm_statistics_update_once_per_micro_batch(tmp_path):
    model = tiny_resnet()
    train(model, tmp_path, image_data(), optim="xsam", xsam_probe_every=1, gradient_accumulation_steps=2,
          max_steps=3)
    counts = {m.num_batches_tracked.item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {6}


def test_logs_xsam_metrics_and_probe_losses(tmp_path):
    trainer = train(tiny_bert(), tmp_path, optim="xsam", xsam_rho=0.2, xsam_probe_every=2, max_steps=4,
                    logging_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert 0.0 <= entry["xsam/psi"] <= math.pi
        assert entry["xsam/ascent_loss"] > 0
        assert entry["xsam/probe_loss_max"] > 0
        assert entry["xsam/alpha"] in [round(0.1 * i, 12) for i in range(21)]
        assert "xsam/correction" not in entry  # only the cheap mode with reuse carries a correction
    probes = [h for h in trainer.state.log_history if "xsam/probe_losses" in h]
    assert [p["step"] for p in probes] == [1, 3]
    for probe in probes:
        losses = probe["xsam/probe_losses"]
        assert len(losses) == len(probe["xsam/probe_alphas"]) == 21
        assert probe["xsam/alpha"] == probe["xsam/probe_alphas"][losses.index(max(losses))]
    assert probes[-1]["xsam/alpha"] == trainer.xsam.alpha
    assert logs[-1]["xsam/probe_loss_max"] == pytest.approx(max(probes[-1]["xsam/probe_losses"]), rel=1e-5)


@pytest.mark.parametrize("optim", ["xsam", "sam"])
def test_model_card_tags_and_hyperparameters(tmp_path, optim):
    trainer = train(tiny_bert(), tmp_path, optim=optim, max_steps=1, xsam_rho=0.07)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert header.count("- xsam\n") == 1
    assert f"- {optim}" in header
    assert "| rho | 0.07 |" in card
    assert f"| base_optim | {TrainingArguments.default_optim} |" in card  # the Trainer's own default
    assert "| sharpness_every | 1 |" in card
    assert f"| probe_every | {200 if optim == 'xsam' else 0} |" in card  # as it ran: SAM never probes


def test_evaluation_during_training(tmp_path):
    trainer = XSAMTrainer(model=tiny_bert(), train_dataset=text_data(), eval_dataset=text_data(n=8, seed=3),
                          args=make_args(tmp_path, optim="xsam", eval_strategy="steps", eval_steps=2, max_steps=4))
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(math.isfinite(v) and v > 0 for v in evals)


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    plain, checkpointed = tiny_bert(), tiny_bert()
    train(plain, tmp_path / "a", optim="xsam", xsam_rho=0.2, xsam_probe_every=2)
    train(checkpointed, tmp_path / "b", optim="xsam", xsam_rho=0.2, xsam_probe_every=2,
          gradient_checkpointing=True)
    expected = params_of(plain)
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains(tmp_path):
    model = tiny_bert()
    before = params_of(model)
    trainer = train(model, tmp_path, optim="xsam", bf16=True, xsam_probe_every=2)
    assert max_change(before, model) > 1e-5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_custom_compute_loss_and_label_smoothing(tmp_path):
    class MeanCE(XSAMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = nn.functional.cross_entropy(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

    default, custom, smoothed = tiny_bert(), tiny_bert(), tiny_bert()
    train(default, tmp_path / "a", optim="xsam")
    train(custom, tmp_path / "b", optim="xsam", trainer_cls=MeanCE)
    train(smoothed, tmp_path / "c", optim="xsam", label_smoothing_factor=0.1)
    expected = params_of(default)
    for name, p in custom.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-6, atol=1e-7)
    assert max_change(expected, smoothed) > 1e-7


def test_group_by_length_works(tmp_path):
    model = tiny_bert()
    before = params_of(model)
    data = [dict(d, input_ids=d["input_ids"][: 4 + i % 6]) for i, d in enumerate(text_data())]

    def collate(batch):
        ids = nn.utils.rnn.pad_sequence([b["input_ids"] for b in batch], batch_first=True)
        return {"input_ids": ids, "attention_mask": (ids != 0).long(),
                "labels": torch.tensor([b["labels"] for b in batch])}

    trainer = XSAMTrainer(model=model, train_dataset=data, data_collator=collate,
                          args=make_args(tmp_path, optim="xsam", train_sampling_strategy="group_by_length"))
    trainer.train()
    assert max_change(before, model) > 1e-5


def test_schedule_free_base_trains_and_rho_zero_equals_trainer(tmp_path):
    """A base optimizer with train/eval modes: the Trainer's optimizer.train()/eval() calls reach it through
    XSAM, so it steps in train mode and evaluates at its averaged weights, exactly as under Trainer."""
    settings = dict(learning_rate=1e-3, max_steps=4, eval_strategy="steps", eval_steps=2)
    eval_data = text_data(n=8, seed=3)

    def run(trainer_cls, output_dir, model, **overrides):
        trainer = trainer_cls(model=model, train_dataset=text_data(), eval_dataset=eval_data,
                              args=make_args(output_dir, **settings, **overrides))
        trainer.train()
        return trainer

    reference = run(Trainer, tmp_path / "ref", tiny_bert(), optim="schedule_free_adamw")
    plain = run(XSAMTrainer, tmp_path / "rho0", tiny_bert(), optim="xsam", xsam_rho=0.0,
                xsam_base_optim="schedule_free_adamw")
    assert_params_equal(params_of(reference.model), params_of(plain.model))
    evals = [[h["eval_loss"] for h in t.state.log_history if "eval_loss" in h] for t in (reference, plain)]
    assert evals[0] == evals[1] and len(evals[0]) == 2

    model = tiny_bert()
    before = params_of(model)
    xsam = run(XSAMTrainer, tmp_path / "xsam", model, optim="xsam", xsam_rho=0.05,
               xsam_base_optim="schedule_free_adamw")
    assert type(xsam.xsam.base_optimizer).__name__ == "AdamWScheduleFree"
    assert max_change(before, model) > 0
    assert all(math.isfinite(h["loss"]) for h in xsam.state.log_history if "loss" in h)


def test_replays_restore_small_bookkeeping_and_leave_data_alone(tmp_path):
    """A replayed pass puts counters and metric lists back as they were, but never copies (or scans in full) data
    held as plain lists, such as a tokenized dataset: copying it on every replay once made a MiniLM run 4x slower."""
    from hf_xsam.bookkeeping import bookkeeping_kept

    trainer = train(tiny_bert(), tmp_path, optim="xsam", max_steps=1)
    trainer.tokens_seen, trainer.metrics = 5, {"train": {"entropy": [1.0]}}
    trainer.train_dataset = [{"input_ids": [1] * 64, "labels": 0}] * 1000
    trainer.big_table = list(range(20_000))
    data, table = trainer.train_dataset, trainer.big_table
    with bookkeeping_kept(trainer):
        trainer.tokens_seen += 7
        trainer.metrics["train"]["entropy"].append(2.0)
    assert trainer.tokens_seen == 5 and trainer.metrics == {"train": {"entropy": [1.0]}}
    assert trainer.train_dataset is data and trainer.big_table is table  # not replaced by copies
