"""PPO pieces against hand-worked examples and against TRL's PPO trainer formulas.

TRL 1.x no longer ships its PPO trainer, so its formulas (trl/experimental/ppo/ppo_trainer.py and
trl/trainer/utils.py: masked_mean, masked_var, masked_whiten, the reversed GAE loop, the clipped policy and
value losses) are written out below as an independent reference, line by line in TRL's own form.
"""

import pytest
import torch

from lowalign.losses import adaptive_kl_coef, gae, kl_shaped_rewards, ppo_loss, whiten
from lowalign.losses.ppo import RunningMoments

# ---- TRL's formulas (reference implementation for the tests) ------------------------------------------


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask):
    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    return variance * (mask.sum() / (mask.sum() - 1))


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def trl_gae(rewards, values, padding_mask, gamma, lam):
    """TRL's loop; rewards and values are zero on padding before it (TRL masks values one position later,
    ``padding_mask_p1``; here the value mask is the completion mask, as our spec says padding contributes
    nothing)."""
    values = torch.masked_fill(values, padding_mask, 0)
    rewards = torch.masked_fill(rewards, padding_mask, 0)
    lastgaelam, rev = 0, []
    n = rewards.shape[1]
    for t in reversed(range(n)):
        nextvalues = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    advantages = torch.stack(rev[::-1], axis=1)
    returns = advantages + values
    return torch.masked_fill(advantages, padding_mask, 0), torch.masked_fill(returns, padding_mask, 0)


def trl_ppo_loss(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, mask, cliprange,
                 cliprange_value, vf_coef):
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss = 0.5 * trl_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), mask)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = trl_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


def right_padded_mask(lengths, T):
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()


# ---- GAE ---------------------------------------------------------------------------------------------


def test_gae_worked_example():
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3),
                   gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_trl_on_right_padded_rows(gamma, lam):
    torch.manual_seed(0)
    B, T = 5, 9
    mask = right_padded_mask([9, 1, 4, 7, 2], T)
    r, v = torch.randn(B, T), torch.randn(B, T)
    adv, ret = gae(r, v, mask, gamma, lam)
    ta, tr = trl_gae(r, v, mask == 0, gamma, lam)
    torch.testing.assert_close(adv, ta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, tr, rtol=1e-6, atol=1e-6)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_masked_positions_contribute_nothing():
    """A hole in the middle of a row gives the same values on the valid tokens as the compacted row."""
    torch.manual_seed(1)
    r, v = torch.randn(1, 6), torch.randn(1, 6)
    mask = torch.tensor([[1.0, 1, 0, 1, 0, 1]])
    adv, ret = gae(r, v, mask, 0.9, 0.8)
    keep = mask[0].bool()
    ca, cr = gae(r[:, keep], v[:, keep], torch.ones(1, 4), 0.9, 0.8)
    torch.testing.assert_close(adv[:, keep], ca)
    torch.testing.assert_close(ret[:, keep], cr)
    assert adv[0, 2] == 0 and adv[0, 4] == 0 and ret[0, 2] == 0


# ---- whiten ------------------------------------------------------------------------------------------


def test_whiten_uses_bessel_corrected_masked_moments():
    torch.manual_seed(2)
    x = torch.randn(4, 6) * 3 + 2
    mask = right_padded_mask([6, 2, 5, 3], 6)
    out = whiten(x, mask)
    valid = x[mask.bool()]
    want = (x - valid.mean()) * torch.rsqrt(torch.var(valid) + 1e-8)  # torch.var: unbiased
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, trl_masked_whiten(x, mask))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), trl_masked_whiten(x, mask, shift_mean=False))
    assert abs(out[mask.bool()].mean().item()) < 1e-6 and abs(out[mask.bool()].std().item() - 1) < 1e-5
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.zeros_like(x).index_fill_(1, torch.tensor([0]), 0))


# ---- the loss ----------------------------------------------------------------------------------------


def test_ppo_loss_worked_example():
    """One token, ratio e^0.5 = 1.6487 > 1.2 with A = 1: clipped term wins; value 1.0 vs old 0.5, clip 0.2."""
    lp, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])
    out = ppo_loss(lp, old, torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[0.5]]),
                   torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2, value_clip=0.2, vf_coef=0.1)
    # policy: max(-1 * 1.6487, -1 * 1.2) = -1.2; value: max((1-2)^2, (0.7-2)^2) = 1.69, times 0.5 = 0.845
    assert out.policy_loss.item() == pytest.approx(-1.2)
    assert out.value_loss.item() == pytest.approx(0.845)
    assert out.loss.item() == pytest.approx(-1.2 + 0.1 * 0.845)
    assert out.policy_clipfrac.item() == 1.0 and out.value_clipfrac.item() == 1.0
    assert out.approx_kl.item() == pytest.approx(0.125)


def test_ppo_loss_matches_trl_values_and_gradients():
    torch.manual_seed(3)
    B, T = 6, 7
    mask = right_padded_mask([7, 3, 5, 1, 6, 4], T)
    old = torch.randn(B, T) * 0.5 - 2
    lp = (old + torch.randn(B, T) * 0.4).requires_grad_()  # ratios well outside [0.8, 1.2] for some tokens
    adv = torch.randn(B, T)
    old_v = torch.randn(B, T)
    v = (old_v + torch.randn(B, T) * 0.5).requires_grad_()
    ret = torch.randn(B, T)
    out = ppo_loss(lp, old, adv, v, old_v, ret, mask, clip=0.2, value_clip=0.2, vf_coef=0.1)
    lp2, v2 = lp.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    loss, pg, vf, pgc, vfc = trl_ppo_loss(lp2, old, adv, v2, old_v, ret, mask, 0.2, 0.2, 0.1)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.policy_loss, pg.detach())
    torch.testing.assert_close(out.value_loss, vf.detach())
    torch.testing.assert_close(out.policy_clipfrac, pgc)
    torch.testing.assert_close(out.value_clipfrac, vfc)
    assert 0 < pgc < 1 and 0 < vfc < 1  # both clips active on some tokens, not all
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(lp.grad, lp2.grad)
    torch.testing.assert_close(v.grad, v2.grad)
    assert (lp.grad[mask == 0] == 0).all()


def test_ppo_loss_token_sums_over_num_tokens_add_up_to_the_minibatch_mean():
    """Micro-batches (or ranks) with ``num_tokens`` = the minibatch's token count: their losses and gradients
    sum to those of one masked mean over the minibatch."""
    torch.manual_seed(0)
    B, T = 6, 5
    lp = torch.randn(B, T, requires_grad=True)
    v = torch.randn(B, T, requires_grad=True)
    old_lp, adv, old_v, ret = (torch.randn(B, T) for _ in range(4))
    mask = (torch.rand(B, T) > 0.3).float()
    whole = ppo_loss(lp, old_lp, adv, v, old_v, ret, mask)
    g_whole = torch.autograd.grad(whole.loss, (lp, v))
    n = mask.sum()
    parts = [ppo_loss(lp[s], old_lp[s], adv[s], v[s], old_v[s], ret[s], mask[s], num_tokens=n)
             for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    total = sum(p.loss for p in parts)
    assert total.item() == pytest.approx(whole.loss.item(), rel=1e-6)
    assert sum(p.policy_loss for p in parts).item() == pytest.approx(whole.policy_loss.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(total, (lp, v)), g_whole):
        assert torch.allclose(a, b, atol=1e-7)


def test_explained_variance():
    mask = torch.ones(1, 4)
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    perfect = ppo_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4), ret, ret, ret, mask)
    assert perfect.explained_variance.item() == pytest.approx(1.0)
    const = ppo_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4), ret, torch.full((1, 4), 2.5), ret, mask)
    assert const.explained_variance.item() == pytest.approx(0.0, abs=1e-6)


# ---- rewards and the KL controller -------------------------------------------------------------------


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    lp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, 0.0], [-0.5, -1.0, 0.0, 0.0]])
    mask = right_padded_mask([3, 2], 4)
    r, kl = kl_shaped_rewards(torch.tensor([1.0, -2.0]), lp, ref, mask, kl_coef=0.1, kl_estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5, 0.0], [-0.5, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 0.95, 0.0], [0.05, -2.0, 0.0, 0.0]]))
    _, k3 = kl_shaped_rewards(torch.zeros(2), lp, ref, mask, kl_coef=0.1, kl_estimator="k3")
    d = ref - lp
    torch.testing.assert_close(k3, (torch.exp(d) - d - 1) * mask)


def test_adaptive_kl_coef_follows_ziegler():
    # kl twice the target: the error is clipped to +0.2; 64 sequences over a 10000 horizon
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 100, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 100, 10) == pytest.approx(0.1)


def test_running_moments_equal_moments_of_everything_seen():
    torch.manual_seed(4)
    chunks = [torch.randn(n) * 2 + 1 for n in (5, 17, 3)]
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks).double()
    assert rm.mean == pytest.approx(allx.mean().item(), abs=1e-6)
    assert rm.std == pytest.approx(allx.std().item(), rel=1e-5)
    rm2 = RunningMoments(**rm.state())
    assert rm2.mean == rm.mean and rm2.std == rm.std


def test_rto_dense_reward_worked_example_and_zero_at_the_reference():
    from lowalign.losses import dpo_token_rewards

    r = dpo_token_rewards(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, -3.0]]),
                          torch.tensor([[1, 1, 0]]), beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.05, -0.1, 0.0]]))
    lp = torch.randn(3, 5)
    assert torch.equal(dpo_token_rewards(lp, lp.clone(), torch.ones(3, 5), beta=0.7), torch.zeros(3, 5))


def test_ppo_c_calibration_worked_example():
    from lowalign.losses import calibrated_rewards

    out = calibrated_rewards(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.9, 0.9, float("nan")]), 0.5, 1.0)
    torch.testing.assert_close(out, torch.tensor([1.2, -0.2, 1.0]))
    half = calibrated_rewards(torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5]), 0.0, 2.0)
    torch.testing.assert_close(half, torch.tensor([3.0, -1.0]))  # confidence 1/2 moves nothing


@pytest.mark.parametrize("text,want", [("67. Confidence: 0.8", 0.8), ("Confidence: 80%", 0.8),
                                       ("confidence 8/10", 0.8), ("Confidence level is 0.75", 0.75),
                                       ("Confidence: 7", 0.7), ("Confidence: 45", 0.45), ("67", None),
                                       ("Confidence: 150", None), ("Confidence: 0.2, no, Confidence: 0.9", 0.9)])
def test_verbalized_confidence_parser(text, want):
    from lowalign.rewards import verbalized_confidence

    assert verbalized_confidence(text) == (pytest.approx(want) if want is not None else None)


def test_rto_and_ppo_c_rewards_equal_plain_loops():
    from lowalign.losses import calibrated_rewards, dpo_token_rewards

    g = torch.Generator().manual_seed(0)
    dpo, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    want = torch.tensor([[0.3 * (dpo[i, t] - ref[i, t]) if mask[i, t] else 0.0 for t in range(6)] for i in range(4)])
    torch.testing.assert_close(dpo_token_rewards(dpo, ref, mask, beta=0.3), want)
    r = torch.randn(8, generator=g)
    c = torch.rand(8, generator=g)
    c[[1, 5]] = float("nan")
    want = torch.tensor([r[i] if c[i] != c[i] else r[i] + 0.7 * (c[i] - 0.5) * (r[i] - 0.2) for i in range(8)])
    torch.testing.assert_close(calibrated_rewards(r, c, 0.2, 0.7), want)
