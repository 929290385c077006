"""Foundations of flow-based GRPO post-training (NextStep-1.1's RL stage) on the Gaussian head steps of the
"flow_sde" and "cps" samplers.

    rollout.py  ``rollout``: a group of images per prompt (text-to-image or edits) sampled by the pipeline itself,
                with every head step's state, sample, mean and std recorded (``Rollout``)
    policy.py   ``gaussian_log_prob``; ``step_stats``: a trajectory's per-step log-probabilities and means
                recomputed under the current weights (teacher-forced backbone, guided head), differentiable;
                which steps to train on (``all_steps``, ``random_steps``); parameter sets (``set_trainable``)
    grpo.py     group-normalised advantages, the clipped-ratio loss with the exact per-step KL to a reference
                model, and its diagnostics
    rewards.py  built-in shapes rewards and ``load_reward("module:function")`` for user scorers
    config.py   ``RLConfig``: the ``nextstep train-rl`` recipe (``RolloutConfig``: how rollouts are sampled)
    trainer.py  ``train_rl``: the loop (prompts, rollouts, rewards, advantages, updates), checkpoints, export
"""

from .config import RLConfig, RolloutConfig
from .grpo import GRPOOutput, gaussian_kl, group_advantages, grpo_loss, reward_metrics
from .policy import (
                     PARAMETER_SETS,
                     Steps,
                     StepStats,
                     all_steps,
                     conditions,
                     gaussian_log_prob,
                     random_steps,
                     set_trainable,
                     step_stats,
)
from .rewards import BUILTIN_REWARDS, RewardError, RewardFn, load_reward
from .rollout import Prompt, Rollout, rollout
from .trainer import train_rl

__all__ = ["BUILTIN_REWARDS", "GRPOOutput", "PARAMETER_SETS", "Prompt", "RLConfig", "RewardError", "RewardFn",
           "Rollout", "RolloutConfig", "StepStats", "Steps", "all_steps", "conditions", "gaussian_kl",
           "gaussian_log_prob", "group_advantages", "grpo_loss", "load_reward", "random_steps", "reward_metrics",
           "rollout", "set_trainable", "step_stats", "train_rl"]
