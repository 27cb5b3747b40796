"""The preference-optimization family beyond DPO: ORPO, SimPO, KTO and token-level DPO (TDPO1/2).

Every loss is a pure function on (B,) tensors of *sequence* log-probs (summed over completion tokens unless
the docstring says "averaged": then divided by the completion's length) and returns a ``LossOutput`` with
named metrics. ``PREFERENCE_LOSSES`` registers them by name; the trainers look losses up there.

    orpo   nll(chosen) + lam * -log sigma(log_odds(a_c) - log_odds(a_r)),   log_odds(a) = a - log(1 - e^a)
           (Hong et al. 2024, arXiv 2403.07691; no reference)
    simpo  -(1 - ls) log sigma(beta (a_c - a_r) - gamma) - ls log sigma(-(beta (a_c - a_r) - gamma))
           (Meng et al. 2024, arXiv 2405.14734; no reference)
    kto    lambda_D (1 - sigma(beta (r - z0)))  for desirable rows,  lambda_U (1 - sigma(beta (z0 - r)))  for
           undesirable ones; r = logp - ref, z0 = max(0, mean of r over mismatched pairs), detached
           (Ethayarajh et al. 2024, arXiv 2402.01306)
    tdpo1  -log sigma(beta [(r_c - r_r) - alpha (KL_r - KL_c)])                (Zeng et al. 2024, arXiv 2404.11999)
    tdpo2  the same with KL_c detached (the paper's TDPO2); KL_* = sum over the completion's tokens of the
           full-vocabulary KL(reference || policy) at each position (``lowalign.kernels.kl``)

Semantics follow TRL where TRL has the loss (ORPOTrainer.odds_ratio_loss, CPOTrainer with loss_type simpo,
KTOTrainer._compute_loss); ``tests/losses/test_preference_loss.py`` checks values and gradients against them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowalign.losses.common import LossOutput


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, stable at both ends (Maechler 2012): log(-expm1(a)) near 0, log1p(-exp(a))
    far from it."""
    a = a.clamp(max=-1e-7)  # a log-prob average is < 0; at 0 exactly the odds are infinite
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    rc, rr = scale * chosen.detach(), scale * rejected.detach()
    return {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/accuracy": (rc > rr).float().mean(),
            "rewards/margin": (rc - rr).mean()}


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, lam: float = 0.1) -> LossOutput:
    """ORPO: SFT on the chosen completion plus an odds-ratio preference term, no reference model.

        a_c, a_r     per-token averaged log-probs of chosen / rejected, (B,)
        log_odds(a)  = a - log(1 - exp(a))
        loss         = mean_B[-a_c] + lam * mean_B[-log sigma(log_odds(a_c) - log_odds(a_r))]

    The NLL is the mean over each chosen completion's tokens, then over the batch (TRL's ORPOTrainer averages
    over all chosen tokens of the batch instead; equal when the completions have one length). ``lam`` is
    TRL's ``beta``. Metrics: the implicit rewards ``lam * a`` as TRL logs them, ``log_odds_ratio``,
    ``nll/chosen``.
    """
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    nll = -c.mean()
    loss = nll - lam * ratio.mean()
    with torch.no_grad():
        metrics = {**_pair_metrics(c, r, lam), "log_odds_ratio": log_odds.mean(), "log_sigmoid_odds": ratio.mean(),
                   "nll/chosen": nll.detach()}
    return LossOutput(loss=loss, metrics=metrics)


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO: a length-normalized margin with a target reward margin, no reference model.

        h    = beta (a_c - a_r) - gamma          a_* per-token averaged log-probs, (B,)
        loss = mean_B[-(1 - ls) log sigma(h) - ls log sigma(-h)]

    Equals TRL's CPOTrainer with ``loss_type="simpo"``, ``simpo_gamma=gamma`` and ``cpo_alpha=0``.
    Metrics: implicit rewards ``beta * a``.
    """
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    h = beta * (c - r) - gamma
    per = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    with torch.no_grad():
        metrics = {**_pair_metrics(c, r, beta), "logps/chosen": c.mean(), "logps/rejected": r.mean()}
    return LossOutput(loss=per.mean(), metrics=metrics)


def kto_reference_point(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean_B[logp(y_j | x_i) - ref(y_j | x_i)]) over mismatched pairs
    (i != j: each prompt with another row's completion), detached: a biased but cheap estimate of
    KL(policy || reference) that only sets the level the rewards are compared with. Shape: (B,) -> ()."""
    return (mismatched_logps.detach().float() - ref_mismatched_logps.float()).mean().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor | float, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO: a prospect-theory value of each completion on its own, no pairs.

        r    = logp - ref                                   (B,) summed log-ratios
        v    = lambda_D (1 - sigma(beta (r - z0)))          where labels (desirable)
               lambda_U (1 - sigma(beta (z0 - r)))          elsewhere (undesirable)
        loss = mean_B v

    ``z0`` comes from :func:`kto_reference_point`. Shapes: logps, ref_logps (B,); labels (B,) bool. Equals
    TRL's KTOTrainer (loss_type "kto"). Metrics: mean reward ``beta r`` of each kind present, ``kl`` (z0).
    """
    lab = labels.bool()
    r = logps.float() - ref_logps.float()
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device).detach()
    v = torch.where(lab, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                    undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    with torch.no_grad():
        rw = beta * r.detach()
        metrics = {"kl": z0, "desirable_fraction": lab.float().mean()}
        if lab.any():  # a batch may hold one kind only: then the other's mean is absent, not NaN
            metrics["rewards/desirable"] = rw[lab].mean()
        if (~lab).any():
            metrics["rewards/undesirable"] = rw[~lab].mean()
    return LossOutput(loss=v.mean(), metrics=metrics)


def _tdpo(chosen_ratio, rejected_ratio, chosen_kl, rejected_kl, beta, alpha, stop_chosen_kl) -> LossOutput:
    kl_c = chosen_kl.detach() if stop_chosen_kl else chosen_kl
    logits = (chosen_ratio - rejected_ratio) - alpha * (rejected_kl - kl_c)
    loss = -F.logsigmoid(beta * logits).mean()
    with torch.no_grad():
        metrics = {**_pair_metrics(chosen_ratio, rejected_ratio, beta), "kl/chosen": chosen_kl.detach().mean(),
                   "kl/rejected": rejected_kl.detach().mean()}
    return LossOutput(loss=loss, metrics=metrics)


def tdpo1_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, chosen_kl: torch.Tensor,
               rejected_kl: torch.Tensor, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """TDPO1: DPO's margin corrected by the sequential KL of each side.

        loss = mean_B[-log sigma(beta [(r_c - r_r) - alpha (KL_r - KL_c)])]

    r_* = sum_t log pi(y_t) - log ref(y_t) (B,); KL_* = sum_t KL(ref(.|y<t) || pi(.|y<t)) over the full
    vocabulary (B,). The paper's TDPO1 is alpha = 1. Metrics: rewards ``beta r``, mean KL per side.
    """
    return _tdpo(chosen_ratio, rejected_ratio, chosen_kl, rejected_kl, beta, alpha, stop_chosen_kl=False)


def tdpo2_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, chosen_kl: torch.Tensor,
               rejected_kl: torch.Tensor, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO2: as :func:`tdpo1_loss` with the chosen side's KL detached (no gradient pushes the chosen
    completion's distribution back toward the reference; the paper's default alpha is 0.5)."""
    return _tdpo(chosen_ratio, rejected_ratio, chosen_kl, rejected_kl, beta, alpha, stop_chosen_kl=True)


PREFERENCE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "orpo": orpo_loss, "simpo": simpo_loss, "kto": kto_loss, "tdpo1": tdpo1_loss, "tdpo2": tdpo2_loss}
