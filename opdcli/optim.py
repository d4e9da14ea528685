"""AdamW with a warmup + decay schedule, and one optimizer step with clipping."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from opdcli.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warmup, then constant / linear / cosine decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.schedule_steps if cfg.schedule_steps is not None else max_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        scale = 1.0 - (1.0 - floor) * progress
    else:
        scale = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * scale


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   step: int, max_steps: int) -> dict[str, float]:
    """Set the lr, clip, step, zero grads; return optim/lr and optim/grad_norm. A non-finite
    gradient norm applies no update and adds optim/skipped = 1."""
    lr = lr_at(step, cfg, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    if isinstance(norm, DTensor):  # sharded parameters: the norm over every shard
        norm = norm.full_tensor()
    if not torch.isfinite(norm):  # never apply a non-finite update (the step guard reports it)
        optimizer.zero_grad(set_to_none=True)
        return {"optim/lr": lr, "optim/grad_norm": float(norm), "optim/skipped": 1.0}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"optim/lr": lr, "optim/grad_norm": float(norm)}
