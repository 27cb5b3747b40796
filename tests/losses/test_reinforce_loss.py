"""ReMax and REINFORCE++ advantage estimators: hand-worked values."""

import math

import pytest
import torch

from lowalign.losses.reinforce import reinforce_pp_advantages, remax_advantages, returns_to_go


def test_remax_worked_example():
    adv = remax_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0]), 2)
    assert adv.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="P \\* G"):
        remax_advantages(torch.ones(3), torch.ones(2), 2)


def test_returns_to_go_respects_the_mask():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert returns_to_go(r, m).tolist() == [[6.0, 5.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]]


def test_reinforce_pp_whitens_over_the_batch():
    # no KL (policy == reference): returns are the score on every token; scores [1, 0] over 6 tokens:
    # mean .5, unbiased var 6 (.25) / 5 = .3 -> A = +-.5 / sqrt(.3) = +-.91287
    lp = torch.zeros(2, 3)
    adv, kl = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), lp, lp, torch.ones(2, 3), kl_coef=0.1)
    a = 0.5 / math.sqrt(0.3)
    torch.testing.assert_close(adv, torch.tensor([[a] * 3, [-a] * 3]), rtol=1e-4, atol=1e-4)
    assert kl.abs().sum() == 0
    # the -baseline variant (group of 2): scores become [.5, -.5], the same whitened advantages
    adv_b, _ = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), lp, lp, torch.ones(2, 3), kl_coef=0.1,
                                       group_size=2)
    torch.testing.assert_close(adv_b, adv, rtol=1e-4, atol=1e-4)


def test_reinforce_pp_folds_the_kl_into_the_reward():
    # one row, logp - ref = .2 on each of 3 tokens, k1, kl_coef .5: r = [-.1, -.1, -.1 + 1]; G = [.7, .8, .9]
    lp, ref = torch.full((1, 3), -1.0), torch.full((1, 3), -1.2)
    mask = torch.ones(1, 3)
    adv, kl = reinforce_pp_advantages(torch.tensor([1.0]), lp, ref, mask, kl_coef=0.5, kl_estimator="k1")
    torch.testing.assert_close(kl, torch.full((1, 3), 0.2))
    g = torch.tensor([[0.7, 0.8, 0.9]])
    torch.testing.assert_close(adv, (g - g.mean()) / g.std(), rtol=1e-4, atol=1e-4)
    # k2: (logp - ref)^2 / 2 = .02 per token
    _, kl2 = reinforce_pp_advantages(torch.tensor([1.0]), lp, ref, mask, kl_coef=0.5, kl_estimator="k2")
    torch.testing.assert_close(kl2, torch.full((1, 3), 0.02))
