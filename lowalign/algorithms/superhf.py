"""SuperHF (Mukobi et al. 2023, arXiv 2310.16763): RAFT's filter step (sample, keep the best by reward) and
supervised fine-tuning on the kept completions with a KL prior to the reference (adapters off, or the
starting / soup adapter), iterated: ``L = NLL(kept) + kl_coef * KL(pi || ref)`` on the kept tokens. The
step is RAFT's (``raft.py``) with the prior switched on."""

from __future__ import annotations

from dataclasses import dataclass

from lowalign.algorithms import register
from lowalign.algorithms.raft import RAFTConfig, check, train
from lowalign.config import F


@dataclass
class SuperHFConfig(RAFTConfig):
    kl_coef: float = F(0.1, "Weight of the KL prior to the reference on the kept tokens (SuperHF's beta).", gt=0)


register("superhf", SuperHFConfig, train, check=check, shards="prompts_per_step")
