"""PRO and RRHF: hand-worked values, and an independent plain loop over each list (values and gradients), with
ties, padding and lists of different lengths."""

import math

import pytest
import torch

from lowalign.losses import LISTWISE_LOSSES, list_ranking_accuracy, pro_loss, rrhf_loss


def test_registry():
    assert LISTWISE_LOSSES == {"pro": pro_loss, "rrhf": rrhf_loss}


def _one(p, s):
    p, s = torch.tensor([p]), torch.tensor([s])
    return p, s, torch.ones_like(p)


def test_pro_worked_example_without_gap_temperature():
    # scores 1 > 0.5 > 0: k=0 picks -1 out of {-1, -2, -3}, k=1 picks -2 out of {-2, -3}, k=2 has nothing below
    p, s, m = _one([-1.0, -2.0, -3.0], [1.0, 0.5, 0.0])
    out = pro_loss(p, s, m, p[:, 0], sft_weight=0.0, gap_temperature=False)
    want = -math.log(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))) \
        - math.log(math.exp(-2) / (math.exp(-2) + math.exp(-3)))
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.metrics["ranking_accuracy"].item() == 1.0 and out.metrics["ranked_pairs"].item() == 3


def test_pro_worked_example_with_gap_temperature_and_sft():
    # k=0: gaps to i=1, 2 are 0.5 and 1; its own weight is the largest gap (1)
    # k=1: gap to i=2 is 0.5, its own weight 0.5
    p, s, m = _one([-1.0, -2.0, -3.0], [1.0, 0.5, 0.0])
    out = pro_loss(p, s, m, p[:, 0], sft_weight=0.5, gap_temperature=True)
    k0 = -math.log(math.exp(-1 * 1) / (math.exp(-1 * 1) + math.exp(-2 * 0.5) + math.exp(-3 * 1)))
    k1 = -math.log(math.exp(-2 * 0.5) / (math.exp(-2 * 0.5) + math.exp(-3 * 0.5)))
    assert out.loss.item() == pytest.approx(k0 + k1 + 0.5 * 1.0, rel=1e-6)
    assert out.metrics["nll/best"].item() == pytest.approx(1.0)


def test_rrhf_worked_example():
    # scores order 0 > 2 > 1: hinges max(0, p1 - p0) = 0, max(0, p2 - p0) = 0.5, max(0, p1 - p2) = 0
    p, s, m = _one([-1.0, -2.0, -0.5], [1.0, 0.0, 0.5])
    out = rrhf_loss(p, s, m, p[:, 0], sft_weight=1.0)
    assert out.loss.item() == pytest.approx(0.5 + 1.0)
    assert out.metrics["loss/ranking"].item() == pytest.approx(0.5)
    assert out.metrics["ranking_accuracy"].item() == pytest.approx(2 / 3)


def test_ties_rank_neither_way():
    p, s, m = _one([-1.0, -5.0, -0.1], [1.0, 1.0, 1.0])
    for fn in (pro_loss, rrhf_loss):
        out = fn(p, s, m, p[:, 0], sft_weight=0.0)
        assert out.loss.item() == 0.0 and out.metrics["ranked_pairs"].item() == 0
    assert list_ranking_accuracy(p, s, m).item() == 0.5


def _loop_pro(p, s, m, best, sft_weight, gap):
    total = 0.0
    for l in range(p.shape[0]):
        idx = [j for j in range(p.shape[1]) if m[l, j] > 0]
        for k in idx:
            below = [i for i in idx if s[l, i] < s[l, k]]
            if not below:
                continue
            w = {i: float(s[l, k] - s[l, i]) if gap else 1.0 for i in below}
            wk = max(w.values()) if gap else 1.0
            logits = torch.stack([p[l, k] * wk] + [p[l, i] * w[i] for i in below])
            total = total - (p[l, k] * wk - torch.logsumexp(logits, 0))
    return total / p.shape[0] + sft_weight * (-best.mean())


def _loop_rrhf(p, s, m, best, sft_weight):
    total = 0.0
    for l in range(p.shape[0]):
        idx = [j for j in range(p.shape[1]) if m[l, j] > 0]
        for j in idx:
            for i in idx:
                if s[l, i] < s[l, j]:
                    total = total + torch.clamp(p[l, i] - p[l, j], min=0)
    return total / p.shape[0] + sft_weight * (-best.mean())


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    L, n = 4, 6
    p = (-3 * torch.rand(L, n, generator=g)).requires_grad_()
    s = torch.randint(0, 3, (L, n), generator=g).float() / 2  # few levels: many ties
    m = torch.ones(L, n)
    m[1, 4:] = 0  # shorter lists, padded
    m[3, 3:] = 0
    return p, s, m


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gap", [True, False])
def test_pro_equals_a_plain_loop_in_value_and_gradient(seed, gap):
    p, s, m = _batch(seed)
    best = p[:, 0]
    ours = pro_loss(p, s, m, best, sft_weight=0.3, gap_temperature=gap).loss
    (g1,) = torch.autograd.grad(ours, p)
    ref = _loop_pro(p, s, m, p[:, 0], 0.3, gap)
    (g2,) = torch.autograd.grad(ref, p)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
    assert (g1 * (1 - m)).abs().max() == 0  # padding gets no gradient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rrhf_equals_a_plain_loop_in_value_and_gradient(seed):
    p, s, m = _batch(seed)
    ours = rrhf_loss(p, s, m, p[:, 0], sft_weight=0.7).loss
    (g1,) = torch.autograd.grad(ours, p)
    ref = _loop_rrhf(p, s, m, p[:, 0], 0.7)
    (g2,) = torch.autograd.grad(ref, p)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)


def test_padding_values_do_not_matter():
    p, s, m = _batch(0)
    p2, s2 = p.detach().clone(), s.clone()
    p2[m == 0] = 100.0  # garbage in the padded slots
    s2[m == 0] = 9.0
    for fn in (pro_loss, rrhf_loss):
        a = fn(p.detach(), s, m, p.detach()[:, 0])
        b = fn(p2, s2, m, p2[:, 0])
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
        assert a.metrics["ranking_accuracy"].item() == pytest.approx(b.metrics["ranking_accuracy"].item())
