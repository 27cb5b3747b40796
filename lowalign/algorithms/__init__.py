"""Algorithms, one file each. Each registers its train-config dataclass and its entry function."""

from lowalign.algorithms.configs import DPOConfig, ESSAConfig, GRPOConfig, RewardModelConfig, SFTConfig
from lowalign.config import register_algorithm

register_algorithm("grpo", GRPOConfig, "lowalign.algorithms.grpo:train")
register_algorithm("sft", SFTConfig, "lowalign.algorithms.sft:train")
register_algorithm("dpo", DPOConfig, "lowalign.algorithms.dpo:train", data="preferences")
register_algorithm("reward_model", RewardModelConfig, "lowalign.algorithms.reward_model:train", data="preferences")
register_algorithm("essa", ESSAConfig, "lowalign.algorithms.essa:train")

__all__ = ["DPOConfig", "ESSAConfig", "GRPOConfig", "RewardModelConfig", "SFTConfig"]
