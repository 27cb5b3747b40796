"""Listwise objectives over n scored responses per prompt: PRO and RRHF.

Inputs, padded to the longest list of the batch:

    avg_logps  (L, n)  per-token averaged log-probs of each response under the policy, p_i = log pi(y_i|x) / |y_i|
    scores     (L, n)  each response's reward R_i (higher is better); ties allowed
    mask       (L, n)  1 for a real response, 0 for padding
    best_avg_logps (L,)  p of the list's best response (its SFT term)

Ties rank neither way: a response is "worse" than another only when its score is strictly lower, so two
correct answers are never pushed apart. Both return a ``LossOutput`` with named metrics; ``LISTWISE_LOSSES``
registers them by name.

    pro   sum_k -log [ exp(p_k w_kk) / (exp(p_k w_kk) + sum_{i: R_i < R_k} exp(p_i w_ki)) ] + sft * -p_best
          w_ki = R_k - R_i (the paper's temperature 1 / T_k^i), w_kk = max_i w_ki;  with ``gap_temperature``
          off every w is 1.  (Song et al. 2023, "Preference Ranking Optimization for Human Alignment",
          arXiv 2306.17492, eqs. 5-8)
    rrhf  sum_{R_i < R_j} max(0, p_i - p_j) + sft * -p_best
          (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback without
          tears", arXiv 2304.05302, eqs. 2-4)

The SFT term is the best response's per-token mean NLL (both papers write a token sum; the mean keeps its weight
independent of the answer's length, as ORPO's). Terms are summed over a list and averaged over lists.
"""

from __future__ import annotations

import torch

from lowalign.losses.common import LossOutput


def _worse(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L, n, n) bool: [l, k, i] when response i is real and scores strictly below response k (k real)."""
    m = mask.bool()
    return (scores[:, None, :] < scores[:, :, None]) & m[:, None, :] & m[:, :, None]


def list_ranking_accuracy(avg_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L,): per list, the share of its ranked pairs (R_i < R_k) whose averaged log-probs order the same way
    (p_k > p_i; a tie counts 1/2); 1/2 for a list without a ranked pair."""
    p = avg_logps.detach().float()
    worse = _worse(scores.float(), mask)
    right = (p[:, :, None] > p[:, None, :]).float() + 0.5 * (p[:, :, None] == p[:, None, :]).float()
    n = worse.sum((1, 2))
    return torch.where(n > 0, (right * worse).sum((1, 2)) / n.clamp(min=1), torch.full_like(n, 0.5, dtype=p.dtype))


def _metrics(avg_logps, scores, mask, worse, sft) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        p = avg_logps.detach().float()
        return {"ranking_accuracy": list_ranking_accuracy(p, scores, mask).mean(),
                "ranked_pairs": worse.sum().float() / max(1, scores.shape[0]),
                "logps/mean": (p * mask).sum() / mask.sum().clamp(min=1), "nll/best": sft.detach()}


def pro_loss(avg_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, best_avg_logps: torch.Tensor, *,
             sft_weight: float = 0.05, gap_temperature: bool = True) -> LossOutput:
    """PRO: for every response k with a worse one, a softmax that picks k out of {k} and the responses
    scored below it, plus the SFT term on the best response (shapes in the module docstring).

        ranking = mean_L sum_k [ logsumexp({p_k w_kk} u {p_i w_ki : R_i < R_k}) - p_k w_kk ]
        loss    = ranking + sft_weight * mean_L(-p_best)
    """
    p, s, m = avg_logps.float(), scores.float(), mask.float()
    worse = _worse(s, m)  # (L, k, i)
    if gap_temperature:
        w = (s[:, :, None] - s[:, None, :]) * worse  # (L, k, i): R_k - R_i where i is worse
        w_self = w.amax(-1)  # (L, k)
    else:
        w, w_self = worse.float(), torch.ones_like(p)
    self_logit = p * w_self  # (L, k)
    others = torch.where(worse, p[:, None, :] * w, torch.full_like(w, float("-inf")))  # (L, k, i)
    lse = torch.logsumexp(torch.cat([self_logit[..., None], others], -1), -1)  # (L, k)
    active = worse.any(-1)  # k has at least one worse response
    ranking = ((lse - self_logit) * active).sum(-1).mean()
    sft = -best_avg_logps.float().mean()
    metrics = _metrics(p, s, m, worse, sft)
    metrics["loss/ranking"] = ranking.detach()
    return LossOutput(ranking + sft_weight * sft, metrics)


def rrhf_loss(avg_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, best_avg_logps: torch.Tensor, *,
              sft_weight: float = 1.0) -> LossOutput:
    """RRHF: a hinge on every pair ranked by score, plus the SFT term on the best response (shapes in the
    module docstring).

        ranking = mean_L sum_{(j, i): R_i < R_j} max(0, p_i - p_j)
        loss    = ranking + sft_weight * mean_L(-p_best)
    """
    p, s, m = avg_logps.float(), scores.float(), mask.float()
    worse = _worse(s, m)  # [l, j, i]: i scored below j
    hinge = torch.relu(p[:, None, :] - p[:, :, None])  # [l, j, i] = max(0, p_i - p_j)
    ranking = (hinge * worse).sum((1, 2)).mean()
    sft = -best_avg_logps.float().mean()
    metrics = _metrics(p, s, m, worse, sft)
    metrics["loss/ranking"] = ranking.detach()
    return LossOutput(ranking + sft_weight * sft, metrics)


LISTWISE_LOSSES = {"pro": pro_loss, "rrhf": rrhf_loss}  # name -> loss, for trainers and tests
