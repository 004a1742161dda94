"""Tiny models built from configs and tiny datasets, shared by the Trainer tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_xsam import XSAMTrainer, XSAMTrainingArguments


def tiny_bert(seed: int = 0, dropout: float = 0.1, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=4)
    return ViTForImageClassification(config)


def tiny_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=4)
    return ResNetForImageClassification(config)


def text_data(n: int = 32, length: int = 10, seed: int = 1, num_labels: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (length,), generator=g),
             "labels": int(torch.randint(0, num_labels, (1,), generator=g))} for _ in range(n)]


def image_data(n: int = 32, size: int = 8, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(1, size, size, generator=g),
             "labels": int(torch.randint(0, 4, (1,), generator=g))} for _ in range(n)]


def make_args(output_dir, **overrides) -> XSAMTrainingArguments:
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no",
                    per_device_train_batch_size=4, max_steps=4, logging_steps=1, seed=7,
                    disable_tqdm=True, dataloader_num_workers=0)
    settings.update(overrides)
    return XSAMTrainingArguments(**settings)


def train(model, output_dir, data=None, trainer_cls=XSAMTrainer, **overrides):
    trainer = trainer_cls(model=model, args=make_args(output_dir, **overrides), train_dataset=data or text_data())
    trainer.train()
    return trainer


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def max_change(before: dict, model) -> float:
    return max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
