"""lm-evaluation-harness adapter (optional extra: `pip install upcycle[eval]`, lm-eval 0.4.x).

Importing this module registers the lm-eval model "upcycle": lm-eval's HFLM with the model loaded by
`upcycle.load` (bank-sparse checkpoints and plain dense HF checkpoints alike). lm-eval 0.4 has no
plugin discovery for models, so run it through this module, which registers then calls lm-eval's CLI:

    python -m upcycle.eval.lm_eval_adapter --model upcycle --model_args pretrained=DIR --device cpu --tasks TASK

(pass the device with --device, not in --model_args: lm-eval's CLI adds its own `device`).

or from Python: `import upcycle.eval.lm_eval_adapter` then `lm_eval.simple_evaluate(model="upcycle", ...)`.
Extra model_args: `baseline=NAME` applies a training-free baseline that needs no calibration data
(posthoc-magnitude, global-topk, posthoc-svd); `keep=` and `bank_size=` set its sparsity on a dense
checkpoint (default 16 of 64).
"""

from __future__ import annotations

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-eval adapter needs lm-evaluation-harness: pip install 'upcycle[eval]' (or lm-eval==0.4.13)."
    ) from e

import torch

import upcycle


def _dtype(dtype) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None  # the checkpoint's own dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: use auto, float32, bfloat16 or float16.") from None


@register_model("upcycle")
class UpcycleLM(HFLM):
    """HFLM whose model comes from `upcycle.load(pretrained)` (optionally with a post-hoc baseline)."""

    def _create_model(
        self,
        pretrained: str,
        dtype=None,
        baseline: str | None = None,
        keep: int | str = 16,
        bank_size: int | str = 64,
        **kwargs,
    ) -> None:
        self._model = upcycle.load(pretrained, dtype=_dtype(dtype), device=self.device)
        if baseline:
            from upcycle.eval import resolve_baseline

            recipe, name = resolve_baseline(baseline)
            if name in recipe.baselines_need_calibration:
                raise ValueError(
                    f"baseline {baseline!r} needs calibration data: apply it in Python (upcycle.eval.apply_baseline), "
                    "then evaluate HFLM(pretrained=model, tokenizer=tok) with lm_eval.simple_evaluate."
                )
            recipe.apply_baseline(self._model, name, {"bank_size": int(bank_size), "keep": int(keep)})


def main() -> None:
    """lm-eval's command line, with the "upcycle" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
