"""Dense -> MoE sparse upcycling: every selected SwiGLU FFN becomes a dropless top-k mixture of SwiGLU experts
copied or split from it, with a router; continual training adds the load-balancing and z losses; export
writes native Hugging Face Mixtral / Qwen2-MoE checkpoints (no remote code).

- config.py      MoEUpcycleConfig (the type `upcycle.convert` dispatches on), its checks and derived sizes
- routing.py     top-k routing, load-balance loss (1.0 at balance), z-loss, routing statistics, jitter
- experts.py     GroupedExperts: tokens sorted by expert, grouped GEMM (or a per-expert loop); dense_reference
- modules.py     MoESwiGLU (transformers' in-memory MoE names), the fused shared expert
- partition.py   contiguous and clustered channel partitions (balanced spherical k-means)
- convert.py     convert (copy / split / granular, scaling, Drop-Upcycling, router init), the metadata round trip
- training.py    train hooks: router LR group, aux losses by name, per-layer routing metrics, dead experts,
                 the expert-load heatmap
- export.py      `upcycle export --to mixtral|qwen2_moe|hf`
- info.py, cli.py   `upcycle info` / `upcycle eval` statistics, the convert / train flags
"""

from upcycle.recipes import registry
from upcycle.recipes.moe import cli, export, info, training
from upcycle.recipes.moe.config import MoEUpcycleConfig
from upcycle.recipes.moe.convert import NAME, config_from_section, convert, from_metadata, metadata, upcycle_ffn
from upcycle.recipes.moe.experts import GroupedExperts, dense_reference, grouped_mm_supported
from upcycle.recipes.moe.modules import MoESwiGLU, moe_aux_loss, moe_ffns, moe_layers, set_router_recording

RECIPE = registry.register(registry.Recipe(
    name=NAME,
    summary="dense -> MoE upcycling (experts copied or split from each FFN, top-k router; export to HF "
    "Mixtral / Qwen2-MoE)",
    config_cls=MoEUpcycleConfig,
    convert=convert,
    metadata=metadata,
    from_metadata=from_metadata,
    config_from_section=config_from_section,
    to_dense=None,  # trained experts have no dense equivalent: the teacher is the recorded parent (`source`)
    train_options_cls=training.MoETraining,
    train_hooks=training.train_hooks,
    train_convert_config=training.convert_config,
    exporters={"mixtral": export.exporter("mixtral"), "qwen2_moe": export.exporter("qwen2_moe"),
               "hf": export.exporter("hf")},
    describe=info.describe,
    eval_stats=info.eval_stats,
    summarize=info.summarize,
    format_summary=info.format_summary,
    cli=registry.RecipeCLI(cli.add_convert_arguments, cli.config_from_args, cli.convert_from_args, cli.TRAIN_FLAGS),
))

__all__ = ["RECIPE", "GroupedExperts", "MoESwiGLU", "MoEUpcycleConfig", "convert", "dense_reference",
           "grouped_mm_supported", "moe_aux_loss", "moe_ffns", "moe_layers", "set_router_recording", "upcycle_ffn"]
