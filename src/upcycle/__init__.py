"""upcycle: dense causal LM -> predictor-gated bank-wise sparse SwiGLU model, by continual training."""

from upcycle.config import BankSparseConfig
from upcycle.convert import convert, predictor_recall, to_dense
from upcycle.io import CheckpointError, load, save

__all__ = ["BankSparseConfig", "CheckpointError", "convert", "load", "predictor_recall", "save", "to_dense"]
__version__ = "0.1.0"
