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
