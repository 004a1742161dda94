"""XSAM for trl's `SFTTrainer`: `XSAMSFTTrainer` and `XSAMSFTConfig` (this module imports trl).

Example::

    args = XSAMSFTConfig(output_dir="out", optim="xsam", xsam_rho=0.05, max_length=512)
    trainer = XSAMSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

trl's `compute_loss` counts tokens and logs entropy and token accuracy on every call; the mixin keeps those side
effects to the theta_0 pass of each micro-batch, so `num_tokens` and the metrics read as under plain SFTTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from hf_xsam.trainer import XSAMMixin
from hf_xsam.training_args import XSAMArgumentsMixin


@dataclass
class XSAMSFTConfig(XSAMArgumentsMixin, SFTConfig):
    """`SFTConfig` plus `--optim xsam|sam` and the `--xsam_*` flags (see `XSAMArgumentsMixin`)."""


class XSAMSFTTrainer(XSAMMixin, SFTTrainer):
    """`SFTTrainer` with XSAM when ``args.optim`` is ``"xsam"`` or ``"sam"`` (see `XSAMMixin`)."""
