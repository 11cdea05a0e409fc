"""upcycle: turn a dense causal LM into a sparse one by continual training, and run it fast.

    model = upcycle.convert(model, upcycle.BankSparseConfig())   # the config's type picks the recipe
    model.save_pretrained("sparse")                                # or upcycle.save(model, "sparse", tokenizer)
    model = upcycle.load("sparse")
    ids = upcycle.generate(model, input_ids, max_new_tokens=64)  # CPU decode: static KV cache, fast kernels
"""

from upcycle.generation import generate
from upcycle.io import CheckpointError, load, save
from upcycle.recipes import convert, to_dense
from upcycle.recipes.bank_sparse import BankSparseConfig, predictor_recall
from upcycle.recipes.moe import MoEUpcycleConfig
from upcycle.recipes.nm import NMSparseConfig

__all__ = ["BankSparseConfig", "CheckpointError", "MoEUpcycleConfig", "NMSparseConfig", "convert", "generate",
           "load", "predictor_recall", "save", "to_dense"]
__version__ = "0.1.0"
