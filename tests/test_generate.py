import torch

import upcycle


def test_cached_greedy_generate_equals_recompute_loop(tiny):
    upcycle.convert(tiny, upcycle.BankSparseConfig(keep=16), progress=False)
    prompt = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        out = tiny.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True,
                            attention_mask=torch.ones_like(prompt), pad_token_id=0)
        seq = prompt
        for _ in range(12):
            nxt = tiny(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
