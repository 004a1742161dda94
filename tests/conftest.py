"""Tiny models and seeded batches shared by the XSAM tests (built from code and configs: no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn


@dataclass
class Task:
    """A model family and its data: ``build()`` gives the same initial weights every call (seeded), and
    ``batches(n)`` the same n fresh batches every call (from a seeded generator, so the global RNG that
    dropout uses is left alone)."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    rho: float  # large enough that psi stays well away from 0, small enough that 50 steps are not chaotic
    base_kwargs: dict[str, dict]  # per base optimizer name: its settings for this model

    def batches(self, n: int, seed: int = 0) -> list[dict]:
        generator = torch.Generator().manual_seed(seed)
        return [self.make_batch(generator) for _ in range(n)]


def make_closure(model: nn.Module, loss: Callable, batch: dict, counter: list[int] | None = None):
    """The closure ``XSAM.step`` expects; ``counter[0]`` counts the calls with ``backward=False`` (probes)."""

    def closure(backward: bool = True) -> torch.Tensor:
        value = loss(model, batch)
        if backward:
            value.backward()
        elif counter is not None:
            counter[0] += 1
        return value

    return closure


# ---------------------------------------------------------------------- an MLP with BatchNorm and Dropout
def build_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 3),
    )
    return model.to(dtype).train()


def mlp_batch(generator: torch.Generator) -> dict:
    return {"x": torch.randn(16, 8, generator=generator), "y": torch.randint(0, 3, (16,), generator=generator)}


def mlp_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return nn.functional.cross_entropy(model(batch["x"].to(dtype)).float(), batch["y"])


MLP = Task("mlp", build_mlp, mlp_batch, mlp_loss, rho=0.5,
           base_kwargs={"sgd": dict(lr=0.05, momentum=0.9), "adamw": dict(lr=1e-3, weight_decay=0.01)})


# ---------------------------------------------------------------------- a two-layer BERT, hidden size 32
def build_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=32, num_labels=2,
        # 0.05 rather than 0.02: at 0.02 the attention is uniform and the query/key gradients are ~1e-8,
        # where AdamW turns float32 rounding into full-size steps and no two implementations agree to 1e-5
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).train()


def bert_batch(generator: torch.Generator) -> dict:
    input_ids = torch.randint(1, 100, (8, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:4, 9:] = 0  # some padding, so the mask matters
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.randint(0, 2, (8,), generator=generator)}


def bert_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


# AdamW at a fine-tuning lr, with eps 1e-6: its update divides by sqrt(v), so the coordinates whose gradient is
# at the float32 noise floor would otherwise take lr-sized steps decided by rounding.
BERT = Task("bert", build_bert, bert_batch, bert_loss, rho=0.2,
            base_kwargs={"sgd": dict(lr=0.05, momentum=0.9), "adamw": dict(lr=1e-4, eps=1e-6, weight_decay=0.01)})
TASKS = {task.name: task for task in (MLP, BERT)}
BASES = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


@pytest.fixture
def seeded():
    """A test that uses this starts from a known global RNG state and leaves it, and the thread count, as it
    found them. One thread: these models are tiny, and on a shared 2-core machine two OpenMP threads per op
    slow them down tenfold."""
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(state)
