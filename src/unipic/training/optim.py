"""AdamW parameter groups, the warm-up + constant/cosine learning rate, and an EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from unipic.training.config import OptimConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups as upstream's `MAROptimWrapperConstructor` (spec §12.2): 1-D tensors
    (norms, biases, tables of shape (D,)), every `.bias` and every diffusion-head (`diffloss`)
    parameter get no weight decay; the rest decays. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or "diffloss" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the run's betas/eps (β = (0.9, 0.95), ε = 1e-15 in the paper)."""
    groups = param_groups(module, config.weight_decay)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    # foreach=False: the per-parameter loop gives bit-identical results however the groups are laid out.
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, foreach=False)


def lr_at(step: int, config: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant or cosine.

    Warm-up lasts `ceil(warmup_ratio * max_steps)` steps and rises from lr/warmup to lr; the
    cosine decays from lr to `min_lr_ratio * lr` at the last step.
    """
    warmup = math.ceil(config.warmup_ratio * max_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    span = max(1, max_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the trainable parameters, kept in float32.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so short runs
    (like the embedded recipe's) are not dominated by the initial weights; the paper's 0.9999 is
    reached after about 10^5 updates either way.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
        self.updates = updates

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (in its dtype)."""
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))
