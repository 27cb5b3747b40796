"""Built-in verifiable tasks. Each task generates prompts from a seed and checks answers."""

from lowalign.tasks.arithmetic import ArithmeticTask, correctness_reward, format_reward, length_reward

__all__ = ["ArithmeticTask", "correctness_reward", "format_reward", "length_reward"]
