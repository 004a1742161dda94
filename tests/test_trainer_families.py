"""XSAM in other Trainer families: trl's SFTTrainer (its compute_loss side effects once per micro-batch),
Seq2SeqTrainer with generation, and PEFT adapters."""

from __future__ import annotations

import pytest
import torch
from helpers import dpo_pair, max_change, params_of, preference_pairs, sentences, tiny_llama, tiny_tokenizer

from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer


def sft(output_dir, trainer_cls=XSAMSFTTrainer, model=None, **overrides):
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no", max_steps=3,
                    per_device_train_batch_size=4, logging_steps=1, seed=7, disable_tqdm=True, max_length=32,
                    train_sampling_strategy="sequential", learning_rate=0.1, lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=0.0, dataset_num_proc=None,
                    bf16=False)  # SFTConfig defaults to bf16 autocast, even on the CPU: compare in float32
    settings.update(overrides)
    trainer = trainer_cls(model=model or tiny_llama(), args=XSAMSFTConfig(**settings), train_dataset=sentences(),
                          processing_class=tiny_tokenizer())
    trainer.train()
    return trainer


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_rho_zero_equals_plain_sft_trainer(tmp_path):
    from trl import SFTTrainer

    plain = sft(tmp_path / "plain", trainer_cls=SFTTrainer, optim="sgd")
    ours = sft(tmp_path / "ours", optim="xsam", xsam_rho=0.0, xsam_base_optim="sgd")
    for name, p in plain.model.named_parameters():
        torch.testing.assert_close(dict(ours.model.named_parameters())[name], p, rtol=1e-6, atol=1e-6, msg=name)
    for key in ("loss", "num_tokens", "entropy", "mean_token_accuracy"):
        assert logged(ours, key) == pytest.approx(logged(plain, key), rel=1e-6), key
    assert len(logged(ours, "num_tokens")) == 3


@pytest.mark.parametrize("optim", ["sam", "xsam"])
def test_metrics_and_token_counts_are_those_of_the_theta_0_passes(tmp_path, optim):
    """The extra passes (ascent, probe) run trl's compute_loss too; its token count and metric lists must read as
    if only the theta_0 pass had run: num_tokens equals plain SFTTrainer's, one metric entry per step."""
    from trl import SFTTrainer

    plain = sft(tmp_path / "plain", trainer_cls=SFTTrainer, optim="sgd", gradient_accumulation_steps=2)
    ours = sft(tmp_path / "ours", optim=optim, xsam_rho=0.1, xsam_base_optim="sgd", xsam_probe_every=1,
               gradient_accumulation_steps=2)
    assert logged(ours, "num_tokens") == logged(plain, "num_tokens")
    assert len(logged(ours, "entropy")) == len(logged(plain, "entropy")) == 3
    # the first step's metrics are measured at the same weights (theta_0 of step 0) on the same batch
    assert logged(ours, "entropy")[0] == pytest.approx(logged(plain, "entropy")[0], rel=1e-6)
    assert logged(ours, "mean_token_accuracy")[0] == pytest.approx(logged(plain, "mean_token_accuracy")[0])
    assert max_change(params_of(tiny_llama()), ours.model) > 1e-4


def test_sam_on_sft_equals_a_sam_loop_on_the_same_batches(tmp_path):
    """SAM with SGD over trl's own batches and its token-mean loss, written out."""
    from trl import SFTTrainer

    ours = sft(tmp_path / "ours", optim="sam", xsam_rho=0.2, xsam_base_optim="sgd")
    feeder = SFTTrainer(model=tiny_llama(), args=XSAMSFTConfig(
        output_dir=str(tmp_path / "feed"), use_cpu=True, report_to="none", per_device_train_batch_size=4,
        max_length=32, train_sampling_strategy="sequential", dataset_num_proc=None),
        train_dataset=sentences(), processing_class=tiny_tokenizer())
    batches = list(feeder.get_train_dataloader())[:3]
    model = tiny_llama()
    params = list(model.parameters())
    model.train()

    def loss_of(batch):  # the mean cross-entropy over every labelled (shifted) token of the batch
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=-100)

    for batch in batches:
        g0 = torch.autograd.grad(loss_of(batch), params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g0]))
        e = [0.2 * g / (norm + 1e-12) for g in g0]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        g1 = torch.autograd.grad(loss_of(batch), params)
        with torch.no_grad():
            for p, ei, g in zip(params, e, g1):
                p.sub_(ei)
                p.sub_(0.1 * g)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(ours.model.named_parameters())[name], p, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- Seq2SeqTrainer with generation
def test_seq2seq_trainer_trains_with_xsam_and_generates(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from hf_xsam import XSAMSeq2SeqTrainer, XSAMSeq2SeqTrainingArguments

    torch.manual_seed(0)
    config = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    before = params_of(model)
    g = torch.Generator().manual_seed(4)
    data = [{"input_ids": torch.randint(2, 32, (6,), generator=g), "labels": torch.randint(2, 32, (4,), generator=g)}
            for _ in range(16)]
    args = XSAMSeq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", max_steps=3,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, optim="xsam", xsam_rho=0.05,
        xsam_probe_every=2, predict_with_generate=True, generation_max_length=5, disable_tqdm=True)
    trainer = XSAMSeq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train()
    assert max_change(before, model) > 0
    assert len([h for h in trainer.state.log_history if "xsam/probe_losses" in h]) == 2  # steps 0 and 2
    output = trainer.predict(data[:8], max_length=5)
    # generated token ids (padded by the Trainer), not logits
    assert output.predictions.ndim == 2 and output.predictions.shape[0] == 8
    assert trainer._gen_kwargs["max_length"] == 5
    assert output.metrics["test_loss"] > 0


# ---------------------------------------------------------------------- PEFT adapters
def test_lora_perturbs_only_the_adapter_and_reloads(tmp_path):
    from helpers import text_data, tiny_bert
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_xsam import XSAMTrainer, XSAMTrainingArguments

    model = get_peft_model(tiny_bert(dropout=0.0), LoraConfig(r=4, target_modules=["query", "value"],
                                                              modules_to_save=["classifier"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = XSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                                 max_steps=3, per_device_train_batch_size=4, optim="xsam", xsam_rho=0.1,
                                 xsam_probe_every=2, learning_rate=1e-2, disable_tqdm=True)
    trainer = XSAMTrainer(model=model, args=args, train_dataset=text_data())
    trainer.train()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # the base weights: never perturbed, never stepped
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    # theta_0 holds the adapter (and the saved head) only
    kept = sum(t.numel() for t in trainer.xsam._theta_0.values())
    assert kept == sum(p.numel() for p in trainable.values()) < sum(p.numel() for p in frozen.values())

    trainer.save_model()  # the adapter and PEFT's own card, in output_dir
    trainer.create_model_card(model_name="tiny-lora")
    reloaded = PeftModel.from_pretrained(tiny_bert(dropout=0.0), str(tmp_path))
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=0, atol=0)
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: peft" in header and "- lora" in header  # PEFT's
    assert "- xsam" in header and "## Sharpness-aware training" in card  # and ours


# ---------------------------------------------------------------------- DPOTrainer, through the mixins alone
def test_dpo_trainer_with_the_mixins_trains_and_logs_like_dpo(tmp_path):
    from trl import DPOTrainer

    Config, XSAMDPOTrainer = dpo_pair()
    pairs = preference_pairs(2)

    def run(trainer_cls, output_dir, **xsam):
        args = Config(output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no", max_steps=2,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, bf16=False, disable_tqdm=True,
                      dataset_num_proc=None, logging_steps=1, learning_rate=1e-3, **xsam)
        trainer = trainer_cls(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=pairs,
                              processing_class=tiny_tokenizer())
        trainer.train()
        return trainer

    plain = run(DPOTrainer, tmp_path / "plain", optim="adamw_torch")
    ours = run(XSAMDPOTrainer, tmp_path / "ours", optim="xsam", xsam_rho=0.05, xsam_probe_every=1)
    assert max_change(params_of(tiny_llama()), ours.model) > 0
    assert logged(ours, "num_tokens") == logged(plain, "num_tokens")  # the extra passes counted nothing
    assert logged(ours, "logps/chosen")[0] == pytest.approx(logged(plain, "logps/chosen")[0], rel=1e-5)
    assert len(logged(ours, "rewards/margins")) == 2 and len(logged(ours, "xsam/probe_loss_max")) == 2
