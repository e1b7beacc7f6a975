"""The official MixMIM optimiser: AdamW with per-step warmup + half-cosine, decay on >= 2-D tensors.

Official recipe (`main_pretrain.py`, `util/lr_sched.py`, timm `add_weight_decay`):
AdamW(b1=0.9, b2=0.95, eps=1e-8), weight decay 0.05 on every tensor with >= 2 dims (kernels,
`mask_token`, every `relative_position_bias_table`) and none on 1-D tensors (biases, LayerNorm);
peak lr = base_lr * batch / 256; lr at fractional epoch e is `peak * e / warmup` during warmup,
then `min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`.
optax.adamw's decoupled decay (`-lr_t * wd * p`) is PyTorch AdamW's.

Gradient accumulation (`optim.grad_accum_steps`) is not done here: the train step splits each
batch into micro-batches and hands the optimizer their mean gradient (`step.py`), so one train
step is one optimizer update, `config.batch_size` is the batch of one update (it sets the lr, as
the official `eff_batch_size` does) and the opt_state has the same structure for every k.
Wrapping this optimizer in `optax.MultiSteps` as well would accumulate twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def total_steps(config: Any, steps_per_epoch: int) -> int:
    """Optimizer updates in the run: `config.total_steps` if > 0, else epochs * steps_per_epoch."""
    if config.total_steps > 0:
        return int(config.total_steps)
    return int(round(config.epochs * steps_per_epoch))


def warmup_steps(config: Any, steps_per_epoch: int) -> int:
    """Warmup updates: warmup_epochs * steps_per_epoch, shrunk for runs cut short by total_steps.

    A run shortened with `total_steps` keeps the recipe's warmup fraction (warmup_epochs/epochs),
    so a 200-step smoke run does not spend all of it warming up; never longer than the run.
    """
    total = total_steps(config, steps_per_epoch)
    warmup = config.optim.warmup_epochs * steps_per_epoch
    if config.epochs > 0:
        warmup = min(warmup, total * config.optim.warmup_epochs / config.epochs)
    return int(round(min(warmup, total)))


def peak_lr(config: Any) -> float:
    return config.optim.base_lr * config.batch_size / 256


def make_schedule(peak: float, min_lr: float, warmup: int, total: int) -> Callable:
    """Per-step lr: linear 0 -> peak over `warmup` steps, half-cosine to `min_lr` at `total`."""

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for tensors that get weight decay: every one with >= 2 dims (timm add_weight_decay)."""
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def make_optimizer(
    config: Any, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, lr schedule over optimizer-update counts) for `config.optim`."""
    o = config.optim
    total = total_steps(config, steps_per_epoch)
    schedule = make_schedule(
        peak_lr(config), o.min_lr, warmup_steps(config, steps_per_epoch), total
    )
    adamw = optax.adamw(
        schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    # Clipping sees the (micro-batch averaged) gradient of one update, as the official
    # clip_grad does after its accumulation.
    tx = adamw
    if o.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), adamw)
    return tx, schedule
