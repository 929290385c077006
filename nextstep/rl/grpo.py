"""GRPO on the head's Gaussian steps: group-normalised advantages, the clipped-ratio loss, the exact KL to a frozen
reference model, and the numbers that say whether the policy is on track.

Per image b and chosen step j: ratio = exp(log_prob - old_log_prob), A_b the image's advantage,
    loss = mean_{b,j} [ -min(ratio A_b, clip(ratio, 1 - eps, 1 + eps) A_b) ] + kl_weight * mean_{b,j} KL_{b,j}
with KL_{b,j} = |mean_theta - mean_ref|^2 / (2 std^2): two Gaussians with the same std (the std depends only on the
time grid), so the KL of the step is exact. ``old_log_prob`` are the log-probabilities the updates started from,
best recomputed with ``policy.step_stats`` under the rollout's weights before the first update: the ratio is then
exactly 1 at the first update, whatever rounding separates the cached sampler from the teacher-forced recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4  # added to the group std: a group that barely differs does not blow up


def group_advantages(rewards: torch.Tensor, group: int, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """rewards (B,) prompt-major (image b of prompt b // group) -> advantages (B,) float32: within each group
    (r - mean) / (std + eps), std over the group (population). A group whose rewards are all equal gets exactly 0
    (no signal, and no rounding noise turned into one). A larger ``eps`` damps groups whose rewards barely differ
    (a continuous reward's noise) instead of scaling them up to the full +-1 of a clear win."""
    if rewards.dim() != 1 or rewards.shape[0] % group:
        raise ValueError(f"rewards must be (B,) with B a multiple of the group size {group}, "
                         f"got {tuple(rewards.shape)}")
    r = rewards.double().view(-1, group)  # (P, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + eps)
    flat = r.max(1, keepdim=True).values == r.min(1, keepdim=True).values
    return torch.where(flat, 0.0, adv).float().flatten()


def reward_metrics(rewards: torch.Tensor, group: int) -> dict[str, float]:
    """Reward mean and std over the batch, the mean std within groups (the signal GRPO sees) and the fraction of
    groups whose images all scored the same (they train nothing)."""
    r = rewards.double().view(-1, group)
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std(correction=0)),
            "reward_group_std": float(r.std(1, correction=0).mean()),
            "flat_groups": float((r.max(1).values == r.min(1).values).double().mean())}


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)): mean, ref_mean (..., D), std broadcastable to (..., 1) ->
    (...)."""
    return (mean - ref_mean).pow(2).sum(-1) / (2 * std.squeeze(-1) ** 2)


@dataclass
class GRPOOutput:
    loss: torch.Tensor  # scalar, differentiable: policy loss + kl_weight * kl
    metrics: dict[str, float]  # policy_loss, kl, clip_fraction, ratio_mean/min/max, neg_log_prob (entropy proxy)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip: float,
              kl: torch.Tensor | None = None, kl_weight: float = 0.0) -> GRPOOutput:
    """The clipped-ratio policy-gradient loss over B images x P chosen steps.

    log_prob (B, P) under the current weights (differentiable); old_log_prob (B, P) those the updates started from;
    advantages (B,); clip: the ratio's half-width eps; kl (B, P) from :func:`gaussian_kl` against the reference
    model, weighted by ``kl_weight``."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if kl_weight and kl is None:
        raise ValueError("kl_weight > 0 needs the per-step kl")
    ratio = torch.exp(log_prob - old_log_prob.detach())  # (B, P)
    adv = advantages.to(ratio)[:, None]
    policy = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    loss = policy + kl_weight * kl.mean() if kl is not None else policy
    r = ratio.detach()
    metrics = {"policy_loss": float(policy.detach()), "clip_fraction": float(((r - 1).abs() > clip).double().mean()),
               "ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
               "neg_log_prob": float(-log_prob.detach().mean())}
    if kl is not None:
        metrics["kl"] = float(kl.detach().mean())
    return GRPOOutput(loss, metrics)
