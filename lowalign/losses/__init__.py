"""Pure loss functions and advantage estimators on tensors."""

from lowalign.losses.common import LossOutput, masked_mean
from lowalign.losses.grpo import AGGREGATIONS, grpo_advantages, grpo_loss

__all__ = ["AGGREGATIONS", "LossOutput", "grpo_advantages", "grpo_loss", "masked_mean"]
