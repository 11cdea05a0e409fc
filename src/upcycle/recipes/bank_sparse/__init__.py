"""Predictor-gated bank-wise sparse SwiGLU: the flagship recipe, and the worked example of a recipe bundle.

Per token and layer a predictor scores the d_ff channels; in every bank of `bank_size` consecutive
channels the top `keep` are kept (16 of 64: 4x FFN activation sparsity, fixed work per bank).

- config.py      BankSparseConfig (the type `upcycle.convert` dispatches on)
- modules.py     BankSparseSwiGLU (HF names kept), DenseSwiGLU, the masked-SwiGLU autograd functions
- predictors.py  low-rank and low-bit shadow scorers, the predictor-budget rule
- convert.py     convert / to_dense, the metadata round trip, predictor init (svd, calibrate), recall
- runtime.py     which decode kernel a no-grad forward runs (kernels/ stays tensor in, tensor out)
- training.py    train hooks: keep warm-up, predictor LR group, oracle-BCE aux loss; options
- baselines.py   post-hoc baselines (oracle, threshold, global top-k, svd, Deja Vu-style predictor)
- info.py, cli.py, demo.py   `upcycle info`, the convert/train flags, `upcycle demo`
"""

from upcycle.recipes import registry
from upcycle.recipes.bank_sparse import baselines, cli, info, training
from upcycle.recipes.bank_sparse.config import BankSparseConfig
from upcycle.recipes.bank_sparse.convert import (
    NAME,
    config_from_section,
    convert,
    from_metadata,
    metadata,
    predictor_recall,
    to_dense,
)
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, DenseSwiGLU, sparse_ffns

RECIPE = registry.register(registry.Recipe(
    name=NAME,
    summary="predictor-gated bank-wise sparse SwiGLU (top keep of every bank of FFN channels per token)",
    config_cls=BankSparseConfig,
    convert=convert,
    metadata=metadata,
    from_metadata=from_metadata,
    config_from_section=config_from_section,
    to_dense=to_dense,
    train_options_cls=training.BankSparseTraining,
    train_hooks=training.train_hooks,
    train_convert_config=training.convert_config,
    baselines={k: v for k, v in baselines.BASELINES.items() if k not in baselines.CHECKPOINTS},
    baseline_aliases=baselines.ALIASES,
    baselines_need_calibration=frozenset(baselines.NEEDS_CALIBRATION),
    apply_baseline=baselines.apply_options,
    describe=info.describe,
    summarize=info.summarize,
    format_summary=info.format_summary,
    cli=registry.RecipeCLI(cli.add_convert_arguments, cli.config_from_args, cli.convert_from_args,
                          cli.TRAIN_FLAGS),
))

__all__ = ["RECIPE", "BankSparseConfig", "BankSparseSwiGLU", "DenseSwiGLU", "convert", "predictor_recall",
           "sparse_ffns", "to_dense"]
