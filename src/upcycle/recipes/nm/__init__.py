"""N:M (2:4) semi-structured weight sparsity: in every group of m consecutive inputs of each output row of a
targeted linear, at most n weights are nonzero. A recipe peer of bank-sparse.

- config.py     NMSparseConfig (the type `upcycle.convert` dispatches on)
- masks.py      N:M masks, exactness, hard prune
- oneshot.py    magnitude / Wanda / SparseGPT with sequential layer calibration
- convert.py    convert, the metadata round trip, exactness (the mask is the checkpoint's exact zeros)
- optim.py      AdamS (CAST's adaptive L1 decay), SR-STE's refined decay; FSDP2 shard-local
- training.py   train hooks: CAST (AdamS, mask refresh, weight scaling, hard prune), SR-STE, fixed-mask
- runtime.py    decode-shaped no-grad forwards of 2:4 linears -> the CPU kernel (kernels/cpu/nm.py)
- baselines.py  nm-magnitude / nm-wanda / nm-sparsegpt for `upcycle eval --baseline`
- info.py, cli.py   `upcycle info`, `upcycle eval` statistics, the convert/train flags

Checkpoints hold dense weights with exact zeros, so plain transformers loads the same function
(`plain_loadable`); N:M has no dense form of its own, so distillation uses the dense parent recorded as
`source` by `upcycle convert` (or --teacher).
"""

from upcycle.recipes import registry
from upcycle.recipes.nm import baselines, cli, info, training
from upcycle.recipes.nm.config import NMSparseConfig
from upcycle.recipes.nm.convert import NAME, config_from_section, convert, exactness, from_metadata, metadata
from upcycle.recipes.nm.masks import is_nm, nm_mask

RECIPE = registry.register(registry.Recipe(
    name=NAME,
    summary="N:M (2:4) weight sparsity: one-shot magnitude/Wanda/SparseGPT, CAST or SR-STE training",
    config_cls=NMSparseConfig,
    convert=convert,
    metadata=metadata,
    from_metadata=from_metadata,
    config_from_section=config_from_section,
    to_dense=None,
    train_options_cls=training.NMSparseTraining,
    train_hooks=training.train_hooks,
    train_convert_config=training.convert_config,
    baselines=baselines.BASELINES,
    baseline_aliases=baselines.ALIASES,
    baselines_need_calibration=frozenset(baselines.NEEDS_CALIBRATION),
    apply_baseline=baselines.apply_options,
    describe=info.describe,
    eval_stats=info.eval_stats,
    summarize=info.summarize,
    format_summary=info.format_summary,
    cli=registry.RecipeCLI(cli.add_convert_arguments, cli.config_from_args, cli.convert_from_args, cli.TRAIN_FLAGS),
    plain_loadable=True,
))

__all__ = ["RECIPE", "NMSparseConfig", "convert", "exactness", "is_nm", "nm_mask"]
