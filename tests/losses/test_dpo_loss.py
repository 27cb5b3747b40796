"""DPO variants and reward-model losses: hand-worked values and TRL's own DPOTrainer._compute_loss."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lowalign.losses import bradley_terry_loss, dpo_loss, multi_objective_loss


def test_sigmoid_worked_example():
    # h = (−1 − −2) − (−3 − −2) = 2 ; beta .5 -> −log σ(1) = log(1 + e^{−1}) = .31326
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert math.isclose(out.loss.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert out.metrics["rewards/chosen"] == 0.5 and out.metrics["rewards/rejected"] == -0.5
    assert out.metrics["rewards/accuracy"] == 1.0 and out.metrics["rewards/margin"] == 1.0


def test_ipo_hinge_robust_worked():
    c, r, rc, rr = map(torch.tensor, ([-4.0], [-6.0], [-5.0], [-5.0]))
    ipo = dpo_loss(c, r, rc, rr, beta=0.25, loss_type="ipo", chosen_lengths=torch.tensor([2.0]),
                   rejected_lengths=torch.tensor([4.0]))
    assert math.isclose(ipo.loss.item(), (1 / 2 - (-1 / 4) - 2) ** 2, rel_tol=1e-6)  # (.75 − 2)^2
    hinge = dpo_loss(c, r, rc, rr, beta=0.25, loss_type="hinge")
    assert math.isclose(hinge.loss.item(), 0.5, rel_tol=1e-6)  # relu(1 − .25·2)
    rob = dpo_loss(c, r, rc, rr, beta=0.25, loss_type="robust", label_smoothing=0.1)
    ls, x = 0.1, 0.5
    want = (-(1 - ls) * math.log(1 / (1 + math.exp(-x))) + ls * math.log(1 / (1 + math.exp(x)))) / 0.8
    assert math.isclose(rob.loss.item(), want, rel_tol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(c, r, rc, rr, loss_type="ipo")


def _trl_dpo_loss(pol_tok, ref_c, ref_r, mask, beta, loss_type, ls):
    """TRL's DPOTrainer._compute_loss with a stand-in model returning our per-token log-probs."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is the `bench` extra")
    B2, T1 = pol_tok.shape
    outputs = SimpleNamespace(log_probs=pol_tok * mask[:, 1:], entropy=torch.zeros(B2, T1),
                              mean_logits=torch.zeros(B2, T1), is_top1=torch.zeros(B2, T1, dtype=torch.bool))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=ls, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": torch.zeros(B2, T1 + 1, dtype=torch.long), "attention_mask": torch.ones(B2, T1 + 1),
              "completion_mask": mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_dpo_matches_trl(loss_type, ls):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    tok = (-torch.rand(2 * B, T - 1, generator=g) * 2).requires_grad_()
    mask = torch.zeros(2 * B, T)
    mask[:, 2:] = 1
    mask[3, 5:] = 0  # a shorter chosen completion
    mask[B + 1, 4:] = 0  # a shorter rejected completion
    ref_c, ref_r = -torch.rand(B, generator=g) * 8, -torch.rand(B, generator=g) * 8
    trl = _trl_dpo_loss(tok, ref_c, ref_r, mask, 0.3, loss_type, ls)
    seq = (tok * mask[:, 1:]).sum(1)
    lens = mask[:, 1:].sum(1)
    ours = dpo_loss(seq[:B], seq[B:], ref_c, ref_r, beta=0.3, loss_type=loss_type, label_smoothing=ls,
                    chosen_lengths=lens[:B], rejected_lengths=lens[B:])
    torch.testing.assert_close(ours.loss, trl, rtol=1e-6, atol=1e-7)
    (g1,) = torch.autograd.grad(ours.loss, tok)
    (g2,) = torch.autograd.grad(trl, tok)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)


def test_bradley_terry_and_regression():
    out = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=0.5)
    want = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2
    assert math.isclose(out.loss.item(), want, rel_tol=1e-6) and out.metrics["accuracy"] == 0.5
    pred, tgt = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    mo = multi_objective_loss(pred, tgt, torch.tensor([3.0, 1.0]))
    assert math.isclose(mo.loss.item(), (3 * 0.5 + 1 * 2.0) / 4, rel_tol=1e-6)
    assert mo.metrics["mae/0"] == 0.5 and mo.metrics["mae/1"] == 1.0


def test_within_prompt_ranking_worked_example_and_plain_loop():
    from lowalign.losses import within_prompt_ranking_loss

    o = within_prompt_ranking_loss(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3))
    assert abs(o.loss.item() - (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2) < 1e-6
    assert o.metrics["rank_accuracy"] == 1
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, generator=g), torch.randint(0, 3, (12,), generator=g).float()
    grp = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    terms = [-torch.nn.functional.logsigmoid(s[i] - s[j]) for i in range(12) for j in range(12)
             if grp[i] == grp[j] and t[i] > t[j]]  # pairs across prompts never count
    assert torch.allclose(within_prompt_ranking_loss(s, t, grp).loss, torch.stack(terms).mean())
    z = within_prompt_ranking_loss(s, torch.zeros(12), grp)  # no ordered pair: zero loss, NaN accuracy
    assert z.loss.item() == 0 and torch.isnan(z.metrics["rank_accuracy"])
