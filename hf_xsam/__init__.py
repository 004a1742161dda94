"""hf_xsam: XSAM (eXplicit Sharpness-Aware Minimization, Chen & Zhou, ICLR 2026) for PyTorch and Transformers."""

from hf_xsam.replay import RNGState, frozen_running_stats
from hf_xsam.trainer import XSAMTrainer
from hf_xsam.training_args import XSAMTrainingArguments
from hf_xsam.xsam import XSAM, DirectionInfo

__version__ = "0.1.0"

__all__ = [
    "XSAM",
    "DirectionInfo",
    "RNGState",
    "XSAMTrainer",
    "XSAMTrainingArguments",
    "__version__",
    "frozen_running_stats",
]
