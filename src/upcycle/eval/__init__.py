"""Evaluation: perplexity and per-layer FFN statistics, RULER-style long-context tasks, post-hoc baselines.

    from upcycle.eval import evaluate
    result = evaluate("out/sparse", data="heldout.txt", reference="Qwen2.5-0.5B")
    result["ppl"], result["ffn_density"], result["stats"]["layers"]

Modules: `perplexity` (windows, ppl, KL), `stats` (FFNStats hooks), `tasks` (niah, niah-multikey, cwe,
vt), `baselines` (apply(model, name, config, calibration_ids)), `lm_eval_adapter` (optional extra, not
imported here).
"""

from upcycle.eval.baselines import BASELINES
from upcycle.eval.baselines import apply as apply_baseline
from upcycle.eval.runner import evaluate
from upcycle.eval.stats import FFNStats
from upcycle.eval.tasks import TASKS

__all__ = ["BASELINES", "FFNStats", "TASKS", "apply_baseline", "evaluate"]
