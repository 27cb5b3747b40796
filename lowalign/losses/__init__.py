"""Pure loss functions and advantage estimators on tensors."""

from lowalign.losses.common import LossOutput, masked_mean
from lowalign.losses.dpo import (
    DPO_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    multi_objective_loss,
    within_prompt_ranking_loss,
)
from lowalign.losses.grpo import AGGREGATIONS, grpo_advantages, grpo_loss
from lowalign.losses.listwise import LISTWISE_LOSSES, list_ranking_accuracy, pro_loss, rrhf_loss
from lowalign.losses.ppo import (
    PPOLossOutput,
    adaptive_kl_coef,
    calibrated_rewards,
    dpo_token_rewards,
    gae,
    kl_shaped_rewards,
    ppo_loss,
    whiten,
)
from lowalign.losses.preference import (
    PREFERENCE_LOSSES,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
    tdpo1_loss,
    tdpo2_loss,
)

__all__ = ["AGGREGATIONS", "DPO_LOSSES", "LossOutput", "bradley_terry_loss", "dpo_loss", "grpo_advantages",
           "grpo_loss", "masked_mean", "multi_objective_loss", "PPOLossOutput", "adaptive_kl_coef", "gae",
           "kl_shaped_rewards", "dpo_token_rewards", "calibrated_rewards", "ppo_loss", "whiten",
           "PREFERENCE_LOSSES", "kto_loss", "kto_reference_point", "orpo_loss", "simpo_loss", "LISTWISE_LOSSES",
           "list_ranking_accuracy", "pro_loss", "rrhf_loss", "tdpo1_loss", "tdpo2_loss",
           "within_prompt_ranking_loss"]
