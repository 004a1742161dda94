"""hf_xsam: XSAM (eXplicit Sharpness-Aware Minimization, Chen & Zhou, ICLR 2026) for PyTorch and Transformers.

The optimizer needs only torch: ``from hf_xsam import XSAM`` does not import transformers. The Trainer side is
imported on first use of its names, and trl only by the SFT pair (``pip install hf-xsam[trl]``).
"""

from hf_xsam.hyperparameters import HYPERPARAMETERS
from hf_xsam.replay import RNGState, replayed_pass
from hf_xsam.types import DirectionInfo
from hf_xsam.xsam import XSAM

__version__ = "0.1.0"

# name -> module, for the names that need transformers (PEP 562: loaded when first asked for)
_TRAINER_SIDE = {
    "XSAMArgumentsMixin": "hf_xsam.training_args",
    "XSAMMixin": "hf_xsam.trainer",
    "XSAMSFTConfig": "hf_xsam.sft",
    "XSAMSFTTrainer": "hf_xsam.sft",
    "XSAMSeq2SeqTrainer": "hf_xsam.seq2seq",
    "XSAMSeq2SeqTrainingArguments": "hf_xsam.seq2seq",
    "XSAMTrainer": "hf_xsam.trainer",
    "XSAMTrainingArguments": "hf_xsam.training_args",
}

__all__ = [
    "HYPERPARAMETERS",
    "XSAM",
    "DirectionInfo",
    "RNGState",
    "XSAMArgumentsMixin",
    "XSAMMixin",
    "XSAMSFTConfig",
    "XSAMSFTTrainer",
    "XSAMSeq2SeqTrainer",
    "XSAMSeq2SeqTrainingArguments",
    "XSAMTrainer",
    "XSAMTrainingArguments",
    "__version__",
    "replayed_pass",
]


def __getattr__(name: str):
    if name in _TRAINER_SIDE:
        import importlib

        return getattr(importlib.import_module(_TRAINER_SIDE[name]), name)
    raise AttributeError(f"module 'hf_xsam' has no attribute {name!r}")
