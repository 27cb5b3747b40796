"""ORPO, SimPO, KTO and TDPO: hand-worked values, and TRL's own ORPO / CPO(simpo) / KTO code as references."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lowalign.losses import (
    PREFERENCE_LOSSES,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
    tdpo1_loss,
    tdpo2_loss,
)
from lowalign.losses.preference import log1mexp


def _nls(x):  # -log sigma(x)
    return math.log1p(math.exp(-x))


def test_registry_names_every_loss():
    assert PREFERENCE_LOSSES == {"orpo": orpo_loss, "simpo": simpo_loss, "kto": kto_loss, "tdpo1": tdpo1_loss,
                                 "tdpo2": tdpo2_loss}


def test_log1mexp_is_stable_at_both_ends():
    a = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(a), torch.log(1 - torch.exp(a)))
    x = torch.tensor([-1e-3, -30.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_orpo_worked_example():
    # a_c = log .5 -> odds 1, log-odds 0; a_r = log .25 -> odds 1/3; ratio term -log sigma(log 3) = log(4/3)
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    out = orpo_loss(c, r, lam=0.1)
    assert math.isclose(out.loss.item(), math.log(2) + 0.1 * math.log(4 / 3), rel_tol=1e-6)
    assert math.isclose(out.metrics["log_odds_ratio"].item(), math.log(3), rel_tol=1e-6)
    assert math.isclose(out.metrics["nll/chosen"].item(), math.log(2), rel_tol=1e-6)


def test_simpo_worked_example():
    out = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5)
    assert math.isclose(out.loss.item(), _nls(1.5), rel_tol=1e-6)  # h = 2 (1) - .5
    ls = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert math.isclose(ls.loss.item(), 0.8 * _nls(1.5) + 0.2 * _nls(-1.5), rel_tol=1e-6)
    assert out.metrics["rewards/accuracy"] == 1.0 and out.metrics["rewards/margin"] == 2.0


def test_kto_worked_example():
    # r = [1, -1]; z0 = .5, beta 1: desirable 1 - sigma(.5); undesirable 1 - sigma(.5 + 1)
    sig = lambda x: 1 / (1 + math.exp(-x))
    out = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False]),
                   torch.tensor(0.5), beta=1.0, desirable_weight=2.0, undesirable_weight=1.0)
    assert math.isclose(out.loss.item(), (2 * (1 - sig(0.5)) + (1 - sig(1.5))) / 2, rel_tol=1e-6)
    assert out.metrics["rewards/desirable"] == 1.0 and out.metrics["rewards/undesirable"] == -1.0
    only_good = kto_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([True]), 0.0)
    assert "rewards/undesirable" not in only_good.metrics and only_good.metrics["desirable_fraction"] == 1.0
    # reference point: the mean mismatched log-ratio, clamped at 0, carries no gradient
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert kto_reference_point(lp, torch.tensor([-1.5, -1.5])).item() == 0.0  # mean(.5, -.5) = 0
    z = kto_reference_point(lp, torch.tensor([-2.5, -2.5]))
    assert z.item() == 1.0 and not z.requires_grad


def test_tdpo_worked_examples_and_the_stop_gradient():
    rc, rr = torch.tensor([1.0]), torch.tensor([-1.0])
    kc, kr = torch.tensor([0.2], requires_grad=True), torch.tensor([0.6], requires_grad=True)
    t1 = tdpo1_loss(rc, rr, kc, kr, beta=0.5, alpha=1.0)  # logits 2 - (.6 - .2) = 1.6
    assert math.isclose(t1.loss.item(), _nls(0.8), rel_tol=1e-6)
    t2 = tdpo2_loss(rc, rr, kc, kr, beta=0.5, alpha=0.5)  # logits 2 - .5 (.4) = 1.8
    assert math.isclose(t2.loss.item(), _nls(0.9), rel_tol=1e-6)
    g1 = torch.autograd.grad(t1.loss, (kc, kr))
    g2 = torch.autograd.grad(t2.loss, (kc, kr), allow_unused=True)
    assert g1[0].item() < 0 < g1[1].item()  # TDPO1 pushes the chosen KL up and the rejected one down ...
    assert g2[0] is None and g2[1].item() > 0  # ... TDPO2 leaves the chosen side's KL alone
    assert math.isclose(t1.metrics["kl/rejected"].item(), 0.6, rel_tol=1e-6)


def _tdpo_official(chosen_margin, rejected_margin, chosen_kl, rejected_kl, beta, alpha, tdpo2):
    """The TDPO authors' loss (their trainers.py, tdpo_loss) written out."""
    margin = chosen_margin - rejected_margin
    if tdpo2:
        logits = margin - alpha * (rejected_kl - chosen_kl.detach())
    else:
        logits = margin - (rejected_kl - chosen_kl)
    return -torch.nn.functional.logsigmoid(beta * logits)


def test_tdpo_matches_the_papers_code():
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(6, generator=g, requires_grad=True) for _ in range(4)]
    for tdpo2, fn, alpha in ((False, tdpo1_loss, 1.0), (True, tdpo2_loss, 0.5)):
        ours = fn(*x, beta=0.3, alpha=alpha).loss
        ref = _tdpo_official(*x, 0.3, alpha, tdpo2).mean()
        torch.testing.assert_close(ours, ref)
        grads = [torch.autograd.grad(v, x, allow_unused=True) for v in (ours, ref)]
        for a, b in zip(*grads):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b))


def _rand_tokens(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    tok = (-torch.rand(2 * B, T, generator=g) * 2).requires_grad_()
    return tok


def test_orpo_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer", reason="TRL is the `bench` extra")
    B, T = 5, 6
    tok = _rand_tokens(B, T, 0)  # equal lengths: TRL's batch-token-mean NLL equals our per-sequence mean
    avg = tok.mean(1)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, rc, rr, ratio, log_odds = orpo.ORPOTrainer.odds_ratio_loss(fake, avg[:B], avg[B:])
    trl = -tok[:B].mean() - losses.mean()  # ORPOTrainer: policy_nll_loss - losses.mean()
    ours = orpo_loss(avg[:B], avg[B:], lam=0.25)
    torch.testing.assert_close(ours.loss, trl)
    torch.testing.assert_close(ours.metrics["log_odds_ratio"], log_odds.detach())
    torch.testing.assert_close(ours.metrics["rewards/chosen"], rc.mean())
    torch.testing.assert_close(*[torch.autograd.grad(v, tok)[0] for v in (ours.loss, trl)])


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_matches_trl_cpo(ls):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer", reason="TRL is the `bench` extra")
    tok = _rand_tokens(4, 7, 1)
    avg = tok.mean(1)
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.5, label_smoothing=ls,
                           accelerator=SimpleNamespace(device="cpu"))
    losses, _, _ = cpo.CPOTrainer.cpo_loss(fake, avg[:4], avg[4:])
    ours = simpo_loss(avg[:4], avg[4:], beta=2.5, gamma=0.7, label_smoothing=ls)
    torch.testing.assert_close(ours.loss, losses.mean())
    torch.testing.assert_close(*[torch.autograd.grad(v, tok)[0] for v in (ours.loss, losses.mean())])


def test_kto_matches_trl():
    kto = pytest.importorskip("trl.trainer.kto_trainer", reason="TRL is the `bench` extra")
    g = torch.Generator().manual_seed(2)
    B, T = 6, 5
    tok = (-torch.rand(B, T, generator=g) * 2).requires_grad_()
    mask = torch.zeros(B, T + 1)
    mask[:, 2:] = 1
    mask[1, 4:] = 0
    labels = torch.tensor([True, False, True, True, False, False])
    ref = -torch.rand(B, generator=g) * 6
    kl_pol, kl_ref = -torch.rand(B, generator=g) * 6, -torch.rand(B, generator=g) * 6 - 1
    outputs = SimpleNamespace(log_probs=tok * mask[:, 1:], entropy=torch.zeros(B, T), mean_logits=torch.zeros(B, T))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda model, batch: kl_pol, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.8,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(B, T + 1, dtype=torch.long), "attention_mask": torch.ones(B, T + 1),
              "completion_mask": mask, "label": labels, "ref_logps": ref, "ref_KL_logps": kl_ref}
    trl = kto.KTOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    seq = (tok * mask[:, 1:]).sum(1)
    z0 = kto_reference_point(kl_pol, kl_ref)
    assert z0.item() > 0  # the clamp is not what makes them agree
    ours = kto_loss(seq, ref, labels, z0, beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    torch.testing.assert_close(ours.loss, trl)
    torch.testing.assert_close(*[torch.autograd.grad(v, tok)[0] for v in (ours.loss, trl)])
