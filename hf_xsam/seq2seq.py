"""XSAM for `Seq2SeqTrainer`: `XSAMSeq2SeqTrainer` and `XSAMSeq2SeqTrainingArguments`.

Example::

    args = XSAMSeq2SeqTrainingArguments(output_dir="out", optim="xsam", predict_with_generate=True)
    trainer = XSAMSeq2SeqTrainer(model=t5, args=args, train_dataset=train, eval_dataset=val)
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_xsam.trainer import XSAMMixin
from hf_xsam.training_args import XSAMArgumentsMixin


@dataclass
class XSAMSeq2SeqTrainingArguments(XSAMArgumentsMixin, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus `--optim xsam|sam` and the `--xsam_*` flags (see `XSAMArgumentsMixin`)."""


class XSAMSeq2SeqTrainer(XSAMMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` with XSAM when ``args.optim`` is ``"xsam"`` or ``"sam"`` (see `XSAMMixin`)."""
