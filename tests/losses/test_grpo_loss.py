"""GRPO advantages and losses: hand-worked values, a plain formula, and TRL's own implementation."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lowalign.losses import AGGREGATIONS, grpo_advantages, grpo_loss


def test_advantages_worked_example():
    a = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    # group means .5, Bessel std sqrt(.5)=.70711 -> +-.5 / (.70711 + 1e-4)
    torch.testing.assert_close(a, torch.tensor([0.70700, -0.70700, -0.70700, 0.70700]), atol=1e-5, rtol=0)
    # constant group -> zero advantage, no NaN
    assert grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).abs().max() == 0


def test_advantages_variants():
    r = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0])
    none = grpo_advantages(r, 3, scale="none")
    torch.testing.assert_close(none, torch.tensor([1.0, -1.0, 0.0, -2.0, -2.0, 4.0]))
    batch = grpo_advantages(r, 3, scale="batch")
    torch.testing.assert_close(batch, none / (r.std() + 1e-4))
    loo = grpo_advantages(r, 3, scale="none", leave_one_out=True)
    # RLOO: r_i - mean(others): 3 - 1.5, 1 - 2.5, 2 - 2, 0 - 3, 0 - 3, 6 - 0
    torch.testing.assert_close(loo, torch.tensor([1.5, -1.5, 0.0, -3.0, -3.0, 6.0]))
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo_advantages(r, 4)


def test_loss_worked_example():
    # one sequence, two tokens, A = 1, eps = .2: ratios e^{.5}=1.6487 (clipped to 1.2) and e^{-.1}=.9048
    lp = torch.tensor([[0.0, -0.1]], requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]])
    out = grpo_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 2))
    torch.testing.assert_close(out.loss, -(1.2 + torch.exp(torch.tensor(-0.1))) / 2)
    out.loss.backward()
    # the clipped token gets no gradient; the other gets -ratio/2
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -torch.exp(torch.tensor(-0.1)).item() / 2]]))
    assert out.metrics["clip_ratio/high"] == 0.5 and out.metrics["clip_ratio/low"] == 0


def _plain(lp, old, adv, mask, ref, beta, el, eh, loss_type, L):
    """Independent formula, written out per token with Python loops."""
    B, T = lp.shape
    tot, per_seq, count = 0.0, [], 0.0
    for i in range(B):
        s, n = 0.0, 0.0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            r = torch.exp(lp[i, t] - old[i, t])
            v = -torch.minimum(r * adv[i], torch.clamp(r, 1 - el, 1 + eh) * adv[i])
            if beta:
                d = ref[i, t] - lp[i, t]
                v = v + beta * (torch.exp(d) - d - 1)
            s, n = s + v, n + 1
        per_seq.append(s / max(n, 1))
        tot, count = tot + s, count + n
    return {"grpo": sum(per_seq) / B, "bnpo": tot / count, "dr_grpo": tot / (B * L), "dapo": tot / count}[loss_type]


def _inputs(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = lp.detach() + torch.randn(B, T, generator=g) * 0.4  # big enough to clip both ways
    ref = lp.detach() + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1
    return lp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", sorted(AGGREGATIONS))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_plain_formula(loss_type, beta):
    lp, old, adv, mask, ref = _inputs()
    out = grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                    loss_type=loss_type, max_completion_length=7)
    want = _plain(lp, old, adv, mask, ref, beta, 0.2, 0.28, loss_type, 7)
    torch.testing.assert_close(out.loss, want)
    (g1,) = torch.autograd.grad(out.loss, lp)
    (g2,) = torch.autograd.grad(want, lp)
    torch.testing.assert_close(g1, g2)
    assert 0 < out.metrics["clip_ratio/region"] < 1  # clipping is active in this example


# ---- TRL: call its real GRPOTrainer._compute_loss on the same tensors --------------------------------


def _trl_loss(lp, old, adv, mask, ref, beta, loss_type, L, el, eh):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is the `bench` extra")
    Trainer = trl_grpo.GRPOTrainer
    n_items = mask.sum()
    acc = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                          gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=el, epsilon_high=eh, use_vllm=False,
        vllm_importance_sampling_correction=False, max_completion_length=L, aux_loss_enabled=False,
        current_gradient_accumulation_steps=1, accelerator=acc, _entropy_bonus_enabled=False,
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
    )
    B, T = lp.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": n_items}
    return Trainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_trl(loss_type, seed):
    lp, old, adv, mask, ref = _inputs(seed)
    kw = dict(beta=0.04, loss_type=loss_type, L=7, el=0.2, eh=0.28)
    trl_loss = _trl_loss(lp, old, adv, mask, ref, **kw)
    ours = grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                     loss_type=loss_type, max_completion_length=7)
    assert ours.metrics["clip_ratio/region"] > 0
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-6, atol=1e-7)
    (g_trl,) = torch.autograd.grad(trl_loss, lp)
    (g_ours,) = torch.autograd.grad(ours.loss, lp)
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-6, atol=1e-7)


def test_advantages_match_trl_nanstd():
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    r = torch.tensor([0.3, 1.0, 0.0, 0.5, 0.5, 0.9, 0.1, 0.2])
    g = r.view(-1, 4)
    want = (g - g.mean(1, keepdim=True)) / (nanstd(g, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(grpo_advantages(r, 4), want.view(-1))
