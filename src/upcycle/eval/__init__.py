"""Evaluation: perplexity and per-layer FFN statistics, RULER long-context tasks, every recipe's baselines.

    from upcycle.eval import evaluate
    result = evaluate("out/sparse", data="heldout.txt", reference="Qwen2.5-0.5B")
    result["ppl"], result["ffn_density"], result["stats"]["layers"]

Modules: `perplexity` (windows, ppl, KL), `stats` (FFNStats hooks), `tasks` (RULER's synthetic tasks and
passkey; the generators and scorers are `ruler`), `runner` (`evaluate`), `report` (tables), `lm_eval_adapter`
(optional extra, not imported here).
Baselines belong to their recipes (`upcycle.recipes.bank_sparse.baselines`); `BASELINES` lists them all.
"""

from upcycle.eval.runner import evaluate, resolve_baseline
from upcycle.eval.stats import FFNStats
from upcycle.eval.tasks import TASKS
from upcycle.recipes import registry

BASELINES = {name: text for name, (_, text) in registry.baselines().items()}


def apply_baseline(model, name: str, options: dict | None = None, calibration_ids=None):
    """Apply any recipe's baseline `name` to `model` in place (options: e.g. {"keep": 16, "bank_size": 64})."""
    recipe, canon = resolve_baseline(name)
    return recipe.apply_baseline(model, canon, options or {}, calibration_ids)


__all__ = ["BASELINES", "FFNStats", "TASKS", "apply_baseline", "evaluate"]
