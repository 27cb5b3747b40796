"""Train-section dataclasses of each algorithm (no torch import: `lowalign validate` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from lowalign.config import AUTO, F


@dataclass
class OptimConfig:
    learning_rate: float = F(5e-4, "AdamW learning rate of the adapter.", gt=0)
    weight_decay: float = F(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int = F(0, "Linear warm-up steps.", ge=0)
    schedule: Literal["constant", "cosine", "linear"] = F("constant", "Learning-rate schedule after warm-up.")
    max_grad_norm: float = F(1.0, "Gradient clipping norm (0: off).", ge=0)


@dataclass
class SamplingConfig:
    """What every trainer that samples from the policy each step has (the GRPO family, RAFT, SuperHF)."""

    steps: int = F(100, "Training steps (one generation batch each).", ge=1)
    prompts_per_step: int = F(16, "Distinct prompts per generation batch.", ge=1)
    num_generations: int = F(8, "Completions per prompt (the group size G).", ge=1)
    max_new_tokens: int = F(8, "Completion budget (= max_completion_length for dr_grpo).", ge=1)
    temperature: float = F(1.0, "Sampling temperature; the log-prob kernel uses the same one.", gt=0)
    top_p: float = F(1.0, "Nucleus sampling.", gt=0, le=1)
    top_k: int = F(0, "Top-k sampling (0: off).", ge=0)
    micro_batch_size: Union[int, Literal["auto"]] = F(  # noqa: UP007 (the parser reads typing.Union)
        "auto", "Sequences per forward/backward (0: the whole batch at once). auto: the largest that divides the "
        "batch and whose planned peak (`lowalign plan`) stays within memory_budget, turning gradient "
        "checkpointing on only when model.gradient_checkpointing is auto and nothing fits without it; gradients "
        "accumulate over micro-batches, so the result is the one big batch's up to float rounding.", ge=0)
    memory_budget: str = F(
        "auto", "Peak memory micro_batch_size: auto aims for, like 4GB or 2.5GiB (GB = GiB). auto: 4 GiB on a CPU "
        "(never more than the RAM available at start), the free memory of the GPU on CUDA.")
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.", ge=1)
    max_time_s: float = F(0.0, "Stop after this much training wall time (0: no limit; for benchmarks).", ge=0)


def micro_batch(tc, rows: int) -> int:
    """Rows per forward/backward of a batch of ``rows``: ``micro_batch_size``, or all of them for 0 (and for an
    ``auto`` that no run resolved, e.g. a trainer called directly)."""
    mb = tc.micro_batch_size
    return rows if mb in (0, AUTO) else mb


@dataclass
class RolloutConfig(SamplingConfig):
    """What every on-policy trainer built on the GRPO step has (GRPO, ReMax, REINFORCE++)."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = F(
        "grpo", "Aggregation: grpo (per-sequence mean), bnpo (token mean), dr_grpo (/ B x max len, "
        "arXiv 2503.20783), dapo (global token mean, arXiv 2503.14476).")
    beta: float = F(0.0, "KL coefficient to the adapter-off reference (0 skips the reference pass, as "
                         "DAPO/Dr. GRPO recommend).", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = F("k3", "Per-token KL estimator (Schulman's k3 is unbiased, >= 0).")
    epsilon_low: float = F(0.2, "Lower clip range of the ratio.", ge=0, lt=1)
    epsilon_high: float = F(0.2, "Upper clip range (DAPO's clip-higher uses 0.28).", ge=0)
    num_iterations: int = F(1, "Optimizer passes over each generation batch (old log-probs reused).", ge=1)


@dataclass
class GRPOConfig(RolloutConfig):
    scale_rewards: Literal["group", "batch", "none"] = F(
        "group", "Divide advantages by the group std, the batch std, or nothing (Dr. GRPO).")
    leave_one_out: bool = F(False, "RLOO baseline: mean of the other group members (arXiv 2402.14740).")


@dataclass
class SFTConfig:
    steps: int = F(100, "Optimizer steps.", ge=1)
    batch_size: int = F(32, "Rows per step.", ge=1)
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.", ge=1)


@dataclass
class PreferenceConfig:
    """What every preference algorithm's ``train:`` section has (DPO, ORPO, SimPO, TDPO, KTO)."""

    steps: int = F(150, "Optimizer steps.", ge=1)
    batch_size: int = F(32, "Preference pairs (KTO: feedback rows) per step.", ge=1)
    onpolicy_samples: int = F(4, "Samples per prompt for built-in on-policy pairs.", ge=1)
    max_new_tokens: int = F(6, "Generation budget for built-in on-policy pairs.", ge=1)
    eval_pairs: int = F(500, "Held-out pairs (KTO: rows) for the held-out preference metrics.", ge=1)
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.", ge=1)


@dataclass
class DPOConfig(PreferenceConfig):
    beta: float = F(0.1, "KL strength: implicit reward = beta (logp - ref) (DPO, arXiv 2305.18290).", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = F(
        "sigmoid", "sigmoid (DPO), ipo (arXiv 2310.12036), hinge (SLiC), robust (rDPO, arXiv 2403.00409).")
    label_smoothing: float = F(0.0, "Assumed label-noise rate (conservative DPO / robust DPO).", ge=0, lt=0.5)
    rpo_alpha: float = F(0.0, "Weight of a token-mean NLL on the chosen completion added to the loss (RPO, "
                              "arXiv 2404.19733): keeps chosen log-probs from falling with the rejected ones.", ge=0)
    precompute_ref: bool = F(True, "Compute reference log-probs once for the whole set (cached as safetensors, "
                                   "keyed by the pairs and the content of model, tokenizer and starting "
                                   "adapter), so training runs only the policy.")
    reference_cache_dir: str | None = F(None, "Where the reference log-probs cache lives (default: the run "
                                              "directory); name a shared folder to reuse it across runs.")


@dataclass
class ListwiseConfig:
    """What the listwise objectives' ``train:`` section has (PRO, RRHF): batches of ranked lists, n scored
    responses per prompt."""

    steps: int = F(150, "Optimizer steps.", ge=1)
    batch_size: int = F(8, "Lists (prompts, each with all its scored responses) per step.", ge=1)
    num_lists: int = F(1000, "Built-in task: training prompts, each a list of the right answer, a near miss, a "
                             "rambling, a cut-short and an empty answer, and `onpolicy_samples` of the model's own "
                             "samples, scored by the recipe's rewards.", ge=1)
    onpolicy_samples: int = F(4, "Built-in task: the starting policy's samples added to each list.", ge=0)
    max_new_tokens: int = F(6, "Generation budget of those samples.", ge=1)
    eval_lists: int = F(200, "Held-out lists (held-out prompts) for the held-out ranking accuracy.", ge=1)
    attributes: list[str] = F(factory=list, help="A rating file (data.path): its numeric score columns; a "
                                                 "response's score is their sum weighted by attribute_weights.")
    attribute_weights: list[float] = F(factory=list, help="Weights of `attributes` (default: 1 each).")
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.", ge=1)


@dataclass
class RewardModelConfig:
    steps: int = F(300, "Optimizer steps.", ge=1)
    batch_size: int = F(32, "Pairs (bradley_terry) or pairs' completions (regression) per step.", ge=1)
    objective: Literal["bradley_terry", "regression"] = F(
        "bradley_terry", "Pairwise -log sigma(r_c - r_r - margin), or multi-attribute regression of the task's "
        "scored attributes (correctness, format, length) combined by `attribute_weights`.")
    margin: float = F(0.0, "Bradley-Terry margin.")
    attribute_weights: list[float] = F(factory=lambda: [1.0, 0.1, 0.1],
                                       help="Regression: weight of each attribute in the reward, in the order of "
                                            "`attributes` (built-in task: correctness, format, length).")
    rank_weight: float = F(1.0, "Rating files: weight of a Bradley-Terry term on every two completions of one "
                                "prompt, ordered by their weighted true scores (batches are whole prompts).", ge=0)
    attributes: list[str] = F(factory=list, help="Regression on a rating file (data.path): its numeric score "
                                                 "columns, one head output each (empty: the built-in task's "
                                                 "correctness, format, length, scored on its pairs).")
    adapter_name: str = F("reward", "Name of the reward adapter and its head.")
    likelihood_feature: bool = F(False, "Also feed the head the completion's mean token log-prob under the "
                                        "reward adapter (fused kernel, same backbone pass), times a learned "
                                        "scale: the LM's own likelihood is a correctness signal a last-token "
                                        "head cannot read directly.")
    onpolicy_samples: int = F(4, "Samples per prompt for built-in on-policy pairs.", ge=1)
    max_new_tokens: int = F(6, "Generation budget for built-in on-policy pairs.", ge=1)
    eval_pairs: int = F(500, "Held-out pairs for the pairwise accuracy.", ge=1)
    confidence_pairs: bool = F(False, "PPO-M (arXiv 2410.09724, bradley_terry on pairs): also train on each pair's "
                                      "chosen answer with a high vs a low stated confidence ('Confidence: 0.9' "
                                      "wins) and its rejected answer with low vs high (low wins), so the reward "
                                      "does not pay for confidence alone; held-out: confidence_pairwise_accuracy.")
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule.")
    checkpoint_every: int = F(100, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.", ge=1)


ESSA_AUTO_ROWS = {"cpu": 256, "cuda": 2048}  # eval_batch_rows = 0 (see the field)


@dataclass
class ESSAConfig:
    generations: int = F(100, "ES generations (one population evaluation + one update each).", ge=1)
    population_size: int = F(32, "Members per generation (even: antithetic pairs +eps / -eps).", ge=2)
    sigma: float = F(0.03, "Noise std. With sigma_mode=absolute it is in singular-value units; it must be "
                           "large enough to change the model's outputs (0.03 works on the tiny model from a "
                           "fresh LoRA; 0.1 x mean|s| on a trained LoRA did not move it).", gt=0)
    sigma_mode: Literal["absolute", "relative", "calibrate"] = F(
        "calibrate", "absolute; relative (sigma x mean |s| of the start); or calibrate: starting from sigma, "
        "double it until perturbations change `calibrate_target` of the minibatch's completions (the noise "
        "must be measured by what it does to outputs, not by |s|).")
    calibrate_target: float = F(0.1, "Share of completions a perturbation should change (sigma_mode=calibrate).",
                                gt=0, le=1)
    optimizer: Literal["adam", "sgd", "cma"] = F("adam", "Ascent on the ES gradient (adam, sgd) or a diagonal "
                                                         "CMA-ES (sep-CMA, Ros & Hansen 2008).")
    learning_rate: float = F(0.015, "Step size of adam/sgd on the singular values.", gt=0)
    weight_decay: float = F(0.0, "Decoupled weight decay toward s = 0.", ge=0)
    prompts_per_generation: int = F(64, "Minibatch shared by all members of a generation (fair comparison).", ge=1)
    eval_batch_rows: int = F(0, "Rows (members x prompts) per generation call: members are evaluated together, "
                                "each row with its own singular values (at most prompts_per_generation: one "
                                "member per call). 0: 256 on CPU (the fastest measured on a 2-core CPU; 2048-row "
                                "calls were slower there), 2048 on CUDA.", ge=0)
    do_sample: bool = F(False, "Sampled (true) or greedy (false) decoding for fitness.")
    temperature: float = F(1.0, "Sampling temperature when do_sample.", gt=0)
    max_new_tokens: int = F(6, "Completion budget.", ge=1)
    top_fraction: float = F(1.0, "Evolve only the top fraction of singular values per module (rest frozen).",
                            gt=0, le=1)
    s_init: float = F(0.0, "Singular values of a fresh LoRA; 0 starts at the base.")
    subspace: Literal["base", "random"] = F(
        "base", "Directions U, V of a fresh LoRA: the base weight's top-r singular vectors (base: the update "
        "rescales the directions the layer uses most, as Transformer-2's SVF does) or random orthonormal ones "
        "(random). A LoRA started from a saved adapter always uses that adapter's own SVD.")
    checkpoint_every: int = F(10, "Save a checkpoint every N generations (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(5, "Print a progress line every N generations when not on a terminal.", ge=1)
    max_time_s: float = F(0.0, "Stop after this much training wall time (0: no limit; for benchmarks).", ge=0)

    def rows_per_call(self, device_type: str) -> int:
        """``eval_batch_rows``, or where it is 0 the device's default (:data:`ESSA_AUTO_ROWS`)."""
        return self.eval_batch_rows or ESSA_AUTO_ROWS.get(device_type, ESSA_AUTO_ROWS["cuda"])
