"""Algorithms, one file each. Each registers its train-config dataclass and its entry function."""

from lowalign.algorithms.configs import GRPOConfig, SFTConfig
from lowalign.config import register_algorithm

register_algorithm("grpo", GRPOConfig, "lowalign.algorithms.grpo:train")
register_algorithm("sft", SFTConfig, "lowalign.algorithms.sft:train")

__all__ = ["GRPOConfig", "SFTConfig"]
