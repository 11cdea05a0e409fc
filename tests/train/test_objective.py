import torch

import upcycle
from upcycle.recipes.bank_sparse.training import record_aux
from upcycle.testing import tiny_model
from upcycle.train.objective import Objective, lm_losses, teacher_hidden_states


def test_chunked_losses_equal_full_logits_losses_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 33, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double()
    teacher_h = torch.randn(2, 33, 16, dtype=torch.float64)
    teacher_head = torch.nn.Linear(16, 50, bias=False).double()
    ids = torch.randint(0, 50, (2, 33))
    ce, kl = lm_losses(hidden, head, ids, teacher_h, teacher_head, temperature=2.0, chunk_tokens=7)
    (ce + kl).backward()
    got = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    # reference: full logits, plain formulas
    s = head(hidden)[:, :-1].reshape(-1, 50)
    t = teacher_head(teacher_h)[:, :-1].reshape(-1, 50)
    ref_ce = torch.nn.functional.cross_entropy(s, ids[:, 1:].reshape(-1))
    ref_kl = torch.nn.functional.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1), log_target=True,
                                        reduction="batchmean") * 4
    (ref_ce + ref_kl).backward()
    assert torch.allclose(ce, ref_ce) and torch.allclose(kl, ref_kl)
    assert torch.allclose(got[0], hidden.grad) and torch.allclose(got[1], head.weight.grad)


def test_objective_matches_hf_loss_and_teacher_of_itself_gives_zero_kl():
    model = tiny_model(vocab_size=512)
    ids = torch.randint(0, 512, (2, 40))
    hf = model(ids, labels=ids).loss
    obj = Objective(model, distill_weight=1.0, chunk_tokens=16)
    th = teacher_hidden_states(model, ids)
    out = obj(ids, th, model.get_output_embeddings())
    assert torch.allclose(out["ce"], hf, atol=1e-5)
    assert out["kl"].abs().item() < 1e-5


def test_aux_term_reaches_the_predictor_only_through_its_weight():
    model = tiny_model(vocab_size=512)
    upcycle.convert(model, upcycle.BankSparseConfig(keep=16, predictor="lowrank"), progress=False)
    obj = Objective(model)
    ids = torch.randint(0, 512, (2, 24))
    record_aux(model, True)
    out = obj(ids, aux_weight=0.5)
    assert out["aux"].item() > 0
    assert torch.allclose(out["loss"], out["ce"] + 0.5 * out["aux"])
    out["loss"].backward()
    record_aux(model, False)
    assert all(m.aux_loss is None and not m.record_aux for m in model.modules() if hasattr(m, "record_aux"))


def test_feature_loss_is_zero_against_itself_and_pulls_the_student_toward_the_teacher():
    from upcycle.train.objective import feature_loss

    teacher = tiny_model(vocab_size=512)
    student = tiny_model(vocab_size=512, seed=1)
    ids = torch.randint(0, 512, (2, 24))
    th, tf = teacher_hidden_states(teacher, ids, features=True)
    assert len(tf) == teacher.config.num_hidden_layers
    same = Objective(teacher, feature_weight=1.0)(ids, th, teacher.get_output_embeddings(), teacher_features=tf)
    assert same["feat"].item() < 1e-10
    obj = Objective(student, distill_weight=0.0, feature_weight=2.0)
    out = obj(ids, th, teacher.get_output_embeddings(), teacher_features=tf)
    assert out["feat"].item() > 0.1 and torch.allclose(out["loss"], out["ce"] + 2.0 * out["feat"])
    # the normalised MSE itself, written out for one layer pair
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    assert torch.allclose(feature_loss((s,), (t,)), ((s - t) ** 2).mean() / (t**2).mean())
    out["loss"].backward()
    assert all(p.grad is not None for p in student.get_decoder().layers[0].mlp.parameters())
