"""Tiny models, seeded data and assertions shared by the tests (built from code and configs: no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

# the probe grid of the default alpha_step 0.1 and alpha_max 2
GRID = [round(0.1 * i, 10) for i in range(21)]


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


def small_net() -> nn.Module:
    """A seeded MLP without BatchNorm or Dropout: every pass of a step computes the same function."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def counting(model: nn.Module) -> list[int]:
    """Counts the model's forward passes (a hook on the outermost module)."""
    count = [0]
    model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


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
def tiny_bert(seed: int = 0, dropout: float = 0.1, num_labels: int = 3, vocab_size: int = 64,
              initializer_range: float = 0.02) -> BertForSequenceClassification:
    """The one tiny BERT of the tests: 2 layers, hidden size 32, 2 heads."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, max_position_embeddings=32,
        num_labels=num_labels, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def like_one_batch(model: nn.Module) -> nn.Module:
    """BERT's forward takes ``**kwargs`` but ignores ``num_items_in_batch``, so Transformers' Trainer sums the
    mean losses of a step's micro-batches (and multiplies by the processes with ``average_tokens_across_devices``),
    under a built-in optimizer and XSAM alike. ``accepts_loss_kwargs = False`` makes it divide each mean loss by
    the accumulation steps and count no items: then any split of a step's batch trains like the whole batch."""
    model.accepts_loss_kwargs = False
    return model


def build_bert(seed: int = 0) -> nn.Module:
    # initializer_range 0.05 rather than 0.02: at 0.02 the attention is uniform and the query/key gradients are
    # ~1e-8, where AdamW turns float32 rounding into full-size steps and no two implementations agree to 1e-5
    return tiny_bert(seed, num_labels=2, vocab_size=100, initializer_range=0.05).train()


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


# ---------------------------------------------------------------------- a tiny causal LM and its tokenizer
WORDS = "the a market rose fell sharply today as shares bank rates film star won award match team goal".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code (no download)."""
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over the word-level vocabulary of `tiny_tokenizer`."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=2, bos_token_id=2)
    return LlamaForCausalLM(config)


def sentences(n: int = 16, seed: int = 3) -> Dataset:
    """n seeded sentences of 3 to 11 words, as a `text` column."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        rows.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))
    return Dataset.from_dict({"text": rows})


def padded_text(n: int, low: int, high: int, length: int = 12, seed: int = 2) -> list[dict]:
    """Right-padded causal-LM rows of different real lengths, token ids in [low, high): padding is masked and
    carries no label."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        real = int(torch.randint(3, length + 1, (1,), generator=g))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:real] = torch.randint(low, high, (real,), generator=g)
        mask = (torch.arange(length) < real).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def preference_pairs(repeat: int) -> Dataset:
    """Prompt / chosen / rejected rows over `tiny_tokenizer`'s words, for DPO."""
    return Dataset.from_dict({"prompt": ["the market", "film star", "the team", "bank rates"] * repeat,
                              "chosen": [" rose today", " won award", " goal", " fell"] * repeat,
                              "rejected": [" fell", " the", " a", " rose sharply"] * repeat})


def dpo_pair():
    """(config class, trainer class): trl's DPO with the mixins (imports trl, so only on use)."""
    from dataclasses import dataclass as make_config

    from trl import DPOConfig, DPOTrainer

    from hf_xsam import XSAMArgumentsMixin, XSAMMixin

    @make_config
    class XSAMDPOConfig(XSAMArgumentsMixin, DPOConfig):
        pass

    class XSAMDPOTrainer(XSAMMixin, DPOTrainer):
        pass

    return XSAMDPOConfig, XSAMDPOTrainer


# ---------------------------------------------------------------------- Trainer runs
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


def hand_written_sam(model, data, rho, lr, batch_size, steps, max_grad_norm, micro_batch=None):
    """SAM with SGD, written out over each step's batch of ``batch_size`` examples: ascend along g0/||g0||, take
    g there, clip, step. With ``micro_batch``, m-sharpness: each micro-batch of that size ascends along its own
    gradient and the step uses the mean of their directions."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step in range(steps):
        batch = data[step * batch_size:(step + 1) * batch_size]
        size = micro_batch or batch_size
        micro_batches = [batch[i:i + size] for i in range(0, batch_size, size)]
        direction = [torch.zeros_like(p) for p in params]
        for micro in micro_batches:
            inputs = {"input_ids": torch.stack([b["input_ids"] for b in micro]),
                      "labels": torch.tensor([b["labels"] for b in micro])}
            g0 = torch.autograd.grad(model(**inputs).loss, params)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g0]))
            with torch.no_grad():
                e = [rho * g / (norm + 1e-12) for g in g0]
                for p, ei in zip(params, e):
                    p.add_(ei)
            g1 = torch.autograd.grad(model(**inputs).loss, params)
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.sub_(ei)
                for d, g in zip(direction, g1):
                    d.add_(g / len(micro_batches))
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction]))
        clip = min(1.0, max_grad_norm / (total.item() + 1e-6))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(lr * clip * d)
