"""The split of a step's batch into micro-batches does not change the algorithm (global perturbation): gradient
accumulation trains like one large batch, with token-weighted losses, and the epoch's last shorter window."""

from __future__ import annotations

import pytest
import torch
from helpers import hand_written_sam, like_one_batch, padded_text, params_of, text_data, tiny_bert, train
from transformers import LlamaConfig, LlamaForCausalLM

from hf_xsam import XSAMTrainer

SGD = dict(xsam_base_optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0,
           train_sampling_strategy="sequential", max_grad_norm=0.0)


def probes(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "xsam/probe_losses" in h]


def assert_same_run(a, b) -> None:
    for name, p in a.model.named_parameters():
        torch.testing.assert_close(p.detach(), dict(b.model.named_parameters())[name].detach(), rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert [p["xsam/alpha"] for p in probes(a)] == [p["xsam/alpha"] for p in probes(b)]
    for x, y in zip(probes(a), probes(b)):
        torch.testing.assert_close(torch.tensor(x["xsam/probe_losses"]), torch.tensor(y["xsam/probe_losses"]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optim", ["sam", "xsam"])
def test_accumulation_4_x_2_trains_like_one_batch_of_8(tmp_path, optim):
    data = text_data(n=24)
    settings = dict(SGD, optim=optim, xsam_rho=0.2, xsam_probe_every=2, max_steps=3)
    split = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "split", data, per_device_train_batch_size=2,
                  gradient_accumulation_steps=4, **settings)
    whole = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "whole", data, per_device_train_batch_size=8,
                  **settings)
    assert_same_run(split, whole)
    assert len(probes(split)) == (2 if optim == "xsam" else 0)
    if optim == "xsam":
        assert len({p["xsam/alpha"] for p in probes(split)}) >= 1 and probes(split)[0]["xsam/alpha"] != 1.0
    else:  # and both are SAM over the batch of 8, written out by hand
        reference = tiny_bert(dropout=0.0)
        hand_written_sam(reference, data, rho=0.2, lr=0.5, batch_size=8, steps=3, max_grad_norm=1e9)
        for name, p in params_of(reference).items():
            torch.testing.assert_close(dict(split.model.named_parameters())[name].detach(), p, rtol=1e-5,
                                       atol=1e-6, msg=name)


@pytest.mark.parametrize("optim", ["sam", "xsam"])
def test_the_epochs_last_shorter_window_weighs_examples_not_micro_batches(tmp_path, optim):
    """20 examples, batch 8: steps of 8, 8 and 4. Split 4 x 2, the last window has 2 micro-batches, and each
    example still weighs 1/4 of that step's loss."""
    data = text_data(n=20)
    settings = dict(SGD, optim=optim, xsam_rho=0.2, xsam_probe_every=1, num_train_epochs=1)
    split = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "split", data, per_device_train_batch_size=2,
                  gradient_accumulation_steps=4, max_steps=-1, **settings)
    whole = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "whole", data, per_device_train_batch_size=8,
                  max_steps=-1, **settings)
    assert split.state.global_step == whole.state.global_step == 3
    assert_same_run(split, whole)


# ---------------------------------------------------------------------- a token-level loss: a causal LM with padding
def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(config)


def test_token_level_loss_weighs_every_real_token_alike(tmp_path):
    """A causal LM's step loss is the mean over every real token of the step; split in two micro-batches with
    different token counts, each micro-batch weighs by its tokens (not 1/2), so the run equals the whole batch."""
    data = padded_text(8, low=1, high=64)
    tokens = [sum(int(r["labels"][1:].ne(-100).sum()) for r in data[i:i + 2]) for i in range(0, 8, 2)]
    assert len(set(tokens)) > 1  # the micro-batches do differ in tokens, so a mean of means would differ
    settings = dict(SGD, optim="xsam", xsam_rho=0.1, xsam_probe_every=1, max_steps=2, learning_rate=0.2)
    split = train(tiny_llama(), tmp_path / "split", data, trainer_cls=XSAMTrainer, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, **settings)
    whole = train(tiny_llama(), tmp_path / "whole", data, trainer_cls=XSAMTrainer, per_device_train_batch_size=4,
                  **settings)
    assert_same_run(split, whole)
    # the reported loss is the step's token mean too
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (split, whole)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-5)
