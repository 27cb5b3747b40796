"""Best-of-N selection and the filtered SFT loss (RAFT, SuperHF) against worked examples and plain formulas."""

import pytest
import torch

from lowalign.losses.filtering import best_of_n_mask, filtered_sft_loss


def test_best_of_n_worked_example():
    r = torch.tensor([0.2, 0.9, 0.5, 0.5])
    assert best_of_n_mask(r, 2).tolist() == [False, True, True, False]  # a tie keeps the earlier sample
    assert best_of_n_mask(r, 2, min_reward=0.6).tolist() == [False, True, False, False]
    assert best_of_n_mask(r, 2, keep=2).all()


def test_best_of_n_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (6 * 5,), generator=g).float()  # many ties
    for keep in (1, 2, 5):
        for thr in (None, 2.0):
            want = []
            for p in range(6):
                grp = r[p * 5:(p + 1) * 5].tolist()
                best = sorted(range(5), key=lambda i: (-grp[i], i))[:keep]
                want += [i in best and (thr is None or grp[i] >= thr) for i in range(5)]
            assert best_of_n_mask(r, 5, keep, thr).tolist() == want


def test_best_of_n_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_size"):
        best_of_n_mask(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="keep"):
        best_of_n_mask(torch.zeros(4), 2, keep=3)


def test_filtered_sft_loss_worked_example():
    lp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    out = filtered_sft_loss(lp, torch.ones(1, 2), torch.tensor([[-1.0, -1.0]]), kl_coef=0.5, kl_estimator="k1")
    assert out.metrics["nll"].item() == 2.0 and out.metrics["kl"].item() == -1.0
    assert out.loss.item() == 1.5
    out.loss.backward()  # d/dlp: -1/2 (nll) + 0.5 * 1/2 (k1) per token
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -0.25]]))


def test_filtered_sft_loss_matches_plain_formula_with_padding():
    g = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(3, 5, generator=g) * 3, -torch.rand(3, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    want = -(lp * mask).sum() / mask.sum() + 0.1 * (k3 * mask).sum() / mask.sum()
    assert torch.allclose(filtered_sft_loss(lp, mask, ref, 0.1, "k3").loss, want)
    raft = filtered_sft_loss(lp, mask)  # RAFT: no reference, plain NLL
    assert torch.allclose(raft.loss, -(lp * mask).sum() / mask.sum()) and raft.metrics["kl"] == 0
    with pytest.raises(ValueError, match="ref_logps"):
        filtered_sft_loss(lp, mask, kl_coef=0.1)


def test_policy_filter_worked_example():
    from lowalign.losses.filtering import policy_filter_mask

    r = torch.tensor([0.2, 0.9, 0.5, 1.0, 0.0, 0.0])
    noise = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.5, 0.8])
    assert policy_filter_mask(r, 3, "best_of_n", noise).tolist() == [False, True, False, True, False, False]
    assert policy_filter_mask(r, 3, "best_random", noise).tolist() == [False, True, True, True, False, True]
    assert policy_filter_mask(r, 3, "best_worst", noise).tolist() == [True, True, False, True, False, True]
    same = torch.ones(3)  # all tied: the best is the first, the worst the last, never the same sample twice
    assert policy_filter_mask(same, 3, "best_worst", torch.zeros(3)).tolist() == [True, False, True]


def test_policy_filter_matches_a_plain_loop():
    from lowalign.losses.filtering import policy_filter_mask

    g = torch.Generator().manual_seed(0)
    G = 5
    r = torch.randint(0, 3, (7 * G,), generator=g).float()  # many ties
    noise = torch.rand(7 * G, generator=g)
    for mode in ("best_of_n", "best_random", "best_worst"):
        want = []
        for p in range(7):
            grp, nz = r[p * G:(p + 1) * G].tolist(), noise[p * G:(p + 1) * G].tolist()
            best = max(range(G), key=lambda i: (grp[i], -i))
            keep = {best}
            if mode == "best_random":
                keep.add(max((i for i in range(G) if i != best), key=lambda i: nz[i]))
            if mode == "best_worst":
                keep.add(min(range(G), key=lambda i: (grp[i], -i)))
            want += [i in keep for i in range(G)]
        got = policy_filter_mask(r, G, mode, noise)
        assert got.tolist() == want, mode
        assert got.view(-1, G).sum(1).tolist() == [1 if mode == "best_of_n" else 2] * 7


def test_r_squared_is_the_r2_of_the_least_squares_line():
    import numpy as np

    from lowalign.losses.filtering import r_squared

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g)
    y = 2 * x + torch.randn(50, generator=g)
    a, b = np.polyfit(x.numpy(), y.numpy(), 1)
    resid = y.numpy() - (a * x.numpy() + b)
    want = 1 - (resid ** 2).sum() / ((y.numpy() - y.numpy().mean()) ** 2).sum()
    assert r_squared(x, y).item() == pytest.approx(want, rel=1e-5)
    assert r_squared(x, -3 * x + 1).item() == pytest.approx(1.0)
