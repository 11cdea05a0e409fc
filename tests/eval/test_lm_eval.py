"""The lm-eval adapter on a tiny local task (no downloads). Skipped unless the [eval] extra is installed."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate: pip install 'upcycle[eval]'")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'upcycle[eval]'")

DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " None"], "label": 0},
    {"question": "for i in", "choices": [" range(10):", " banana"], "label": 0},
]
TASK = """\
task: upcycle_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """What HFLM scores: log p(continuation | context), the continuation tokens split from the whole."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))


def test_upcycle_model_in_lm_eval(tmp_path, monkeypatch, sparse_dir, dense_dir):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    import upcycle
    import upcycle.eval.lm_eval_adapter  # noqa: F401  (registers "upcycle")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    tok = AutoTokenizer.from_pretrained(sparse_dir)
    got = {}
    for name, ckpt in (("sparse", sparse_dir), ("dense", dense_dir)):
        r = lm_eval.simple_evaluate(
            model="upcycle", model_args=f"pretrained={ckpt},device=cpu", tasks=["upcycle_tiny_mc"],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True,
        )
        assert 0.0 <= r["results"]["upcycle_tiny_mc"]["acc,none"] <= 1.0
        got[name] = [resp[0][0] for s in r["samples"]["upcycle_tiny_mc"] for resp in s["resps"]]
        model = upcycle.load(ckpt)
        want = [_loglikelihood(model, tok, d["question"], c) for d in DOCS for c in d["choices"]]
        assert got[name] == pytest.approx(want, abs=1e-3)
    assert got["sparse"] != pytest.approx(got["dense"], abs=1e-6)  # the sparse checkpoint really ran sparse
