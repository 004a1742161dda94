"""XSAM in other Trainer families: trl's SFTTrainer (its compute_loss side effects once per micro-batch),
Seq2SeqTrainer with generation, and PEFT adapters."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import max_change, params_of
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer

WORDS = "the a market rose fell sharply today as shares bank rates film star won award match team goal".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code (no download)."""
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=2, bos_token_id=2)
    return LlamaForCausalLM(config)


def sentences(n: int = 16, seed: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        rows.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))
    return Dataset.from_dict({"text": rows})


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
