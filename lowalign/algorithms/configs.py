"""Train-section dataclasses of each algorithm (no torch import: `lowalign validate` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lowalign.config import F


@dataclass
class OptimConfig:
    learning_rate: float = F(5e-4, "AdamW learning rate of the adapter.")
    weight_decay: float = F(0.0, "AdamW weight decay.")
    warmup_steps: int = F(0, "Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = F("constant", "Learning-rate schedule after warm-up.")
    max_grad_norm: float = F(1.0, "Gradient clipping norm (0: off).")


@dataclass
class GRPOConfig:
    steps: int = F(100, "Optimizer steps (one generation batch each, times num_iterations).")
    prompts_per_step: int = F(16, "Distinct prompts per generation batch.")
    num_generations: int = F(8, "Completions per prompt (the group size G).")
    max_new_tokens: int = F(8, "Completion budget (= max_completion_length for dr_grpo).")
    temperature: float = F(1.0, "Sampling temperature; the log-prob kernel uses the same one.")
    top_p: float = F(1.0, "Nucleus sampling.")
    top_k: int = F(0, "Top-k sampling (0: off).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = F(
        "grpo", "Aggregation: grpo (per-sequence mean), bnpo (token mean), dr_grpo (/ B x max len, "
        "arXiv 2503.20783), dapo (global token mean, arXiv 2503.14476).")
    scale_rewards: Literal["group", "batch", "none"] = F(
        "group", "Divide advantages by the group std, the batch std, or nothing (Dr. GRPO).")
    leave_one_out: bool = F(False, "RLOO baseline: mean of the other group members (arXiv 2402.14740).")
    beta: float = F(0.0, "KL coefficient to the adapter-off reference (0 skips the reference pass, as "
                         "DAPO/Dr. GRPO recommend).")
    kl_estimator: Literal["k1", "k2", "k3"] = F("k3", "Per-token KL estimator (Schulman's k3 is unbiased, >= 0).")
    epsilon_low: float = F(0.2, "Lower clip range of the ratio.")
    epsilon_high: float = F(0.2, "Upper clip range (DAPO's clip-higher uses 0.28).")
    num_iterations: int = F(1, "Optimizer passes over each generation batch (old log-probs reused).")
    micro_batch_size: int = F(0, "Sequences per forward/backward (0: the whole batch at once).")
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.")
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.")


@dataclass
class SFTConfig:
    steps: int = F(100, "Optimizer steps.")
    batch_size: int = F(32, "Rows per step.")
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.")
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.")
