"""Human-readable tables of an `evaluate(...)` result."""

from __future__ import annotations


def _f(v, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


# (header, key in a layer summary, key in the overall summary, format)
COLUMNS = [
    ("density", "density", "ffn_density", ".4f"),
    ("bank_util", "bank_utilisation", "bank_utilisation", ".4f"),
    ("dead", "dead_channels", None, ".3f"),
    ("load_max", "bank_load_max", "bank_load_max", ".4f"),
    ("recall", "recall", "recall", ".4f"),
    ("|h|_kept", "mass_kept", "mass_kept", ".4f"),
]


def layer_table(stats: dict) -> list[str]:
    """One row per FFN layer and an `all` row: the columns of COLUMNS."""
    rows = ["layer  " + "  ".join(f"{h:>9}" for h, *_ in COLUMNS)]
    for s in stats["layers"]:
        rows.append(f"{s['layer']:>5}  " + "  ".join(f"{_f(s[k], fmt):>9}" for _, k, _, fmt in COLUMNS))
    cells = ["" if k is None else _f(stats[k], fmt) for _, _, k, fmt in COLUMNS]
    rows.append("  all  " + "  ".join(f"{c:>9}" for c in cells))
    return rows


def format_report(r: dict) -> str:
    sp = r["sparsity"]
    if sp["kind"] == "dense":
        kind = f"dense ({sp['ffn_layers']} FFN layers)"
    elif sp.get("label"):  # a recipe's own description (e.g. MoE: experts, top-k, active parameters)
        kind = sp["label"]
    else:
        keeps = sorted(set(sp["keep"].values()))
        kind = (f"bank-sparse ({sp['sparse_layers']}/{sp['ffn_layers']} FFN layers, keep "
                f"{'/'.join(map(str, keeps))} of {sp['bank_size']})")
    lines = [f"model      {r['model']}  [{kind}]" + (f"  baseline: {sp['baseline']}" if sp["baseline"] else "")]
    if r.get("perplexity"):
        p = r["perplexity"]
        lines.append(
            f"data       {', '.join(p['data'])}: {p['tokens_total']:,} tokens; {p['windows']} windows of seq_len "
            f"{p['seq_len']}, stride {p['stride']}; {p['tokens_scored']:,} tokens scored"
        )
        lines.append(f"ppl        {r['ppl']:.4f}  (mean NLL {p['nll_mean']:.4f} nats/token)")
        if r.get("kl_ref") is not None:
            lines.append(f"KL         {r['kl_ref']:.5f} nats/token  KL(reference || model), reference {r['reference']}")
    lines.append(f"FFN density {_f(r['ffn_density'])}  (fraction of FFN channels reaching down_proj, all layers)")
    if r.get("stats"):
        lines += ["", *layer_table(r["stats"]), *r["stats"].get("lines", [])]  # + a recipe's own lines
    if r.get("tasks"):
        lines += ["", f"{'task':<16} {'length':>7} {'n':>3} {'score':>6} {'ruler':>6} {'exact':>6} {'prompt_tok':>10} "
                      f"{'density':>7} {'recall':>6}"]
        for task, by_len in r["tasks"].items():
            for length, t in by_len.items():
                lines.append(
                    f"{task:<16} {length:>7} {t['n']:>3} {t['score']:>6.3f} {_f(t.get('ruler_score'), '.2f'):>6} "
                    f"{t['exact_match']:>6.3f} {t['prompt_tokens']:>10.0f} {_f(t.get('ffn_density')):>7} "
                    f"{_f(t.get('recall')):>6}"
                )
    return "\n".join(lines)
