"""The pretraining optimiser: AdamW with a per-step warmup and a cosine or multi-step schedule.

The values are each recipe's (configs/*.py); the mechanics follow the official code:
* MixMIM / MAE (`main_pretrain.py`, `util/lr_sched.py`, timm `add_weight_decay`): peak lr =
  base_lr * batch / 256; lr at fractional epoch e is `peak * e / warmup` during warmup, then
  `min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`; weight
  decay on every tensor with >= 2 dims, none on 1-D tensors (biases, LayerNorm).
* SimMIM (`main_simmim.py`, `lr_scheduler.py`, `optimizer.py`): peak lr = base_lr * batch / 512;
  warmup from `warmup_lr` (timm's schedulers, per step), then a multi-step decay (pretraining) or
  timm's cosine (fine-tuning, "timm_cosine": its phase counts from step 0, not from the end of
  the warmup); no weight decay on 1-D tensors and on the names its `no_weight_decay` lists
  (`optim.no_decay`).
optax.adamw's decoupled decay (`-lr_t * wd * p`) is PyTorch AdamW's.

Gradient accumulation (`optim.grad_accum_steps`) is not done here: the train step splits each
batch into micro-batches and hands the optimizer their mean gradient (`step.py`), so one train
step is one optimizer update, `config.batch_size` is the batch of one update (it sets the lr, as
the official `eff_batch_size` does) and the opt_state has the same structure for every k.
Wrapping this optimizer in `optax.MultiSteps` as well would accumulate twice.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mixmae_jax.models.paths import path_name


def total_steps(config: Any, steps_per_epoch: int) -> int:
    """Optimizer updates in the run: `config.total_steps` if > 0, else epochs * steps_per_epoch."""
    if config.total_steps > 0:
        return int(config.total_steps)
    return int(round(config.epochs * steps_per_epoch))


def warmup_steps(config: Any, steps_per_epoch: int) -> int:
    """Warmup updates: `optim.warmup_steps` if >= 0, else warmup_epochs * steps_per_epoch, shrunk
    for runs cut short by total_steps.

    A run shortened with `total_steps` keeps the recipe's warmup fraction (warmup_epochs/epochs),
    so a 200-step smoke run does not spend all of it warming up; never longer than the run.
    """
    total = total_steps(config, steps_per_epoch)
    steps = config.optim.get("warmup_steps", -1)  # a snapshot older than the key: in epochs
    if steps >= 0:
        return min(int(steps), total)
    warmup = config.optim.warmup_epochs * steps_per_epoch
    if config.epochs > 0:
        warmup = min(warmup, total * config.optim.warmup_epochs / config.epochs)
    return int(round(min(warmup, total)))


def peak_lr(config: Any) -> float:
    return config.optim.base_lr * config.batch_size / config.optim.lr_batch_divisor


def make_schedule(peak: float, min_lr: float, warmup: int, total: int, *, warmup_lr: float = 0.0,
                  kind: str = "cosine", decay_steps=(), decay_rate: float = 0.1) -> Callable:
    """Per-step lr: linear warmup_lr -> peak over `warmup` steps, then
    "cosine": half-cosine from peak to `min_lr` at `total` (official MAE/MixMIM per-step form);
    "multistep": peak * decay_rate ** (number of `decay_steps` reached), as timm's
    MultiStepLRScheduler with t_in_epochs=False (SimMIM);
    "timm_cosine": min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * t / total)) for t >= warmup,
    min_lr past `total`, as timm's CosineLRScheduler(t_initial=total, warmup_prefix=False)."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(warmup_lr, peak, warmup, max(total, warmup + 1),
                                                  end_value=min_lr)
    if kind == "multistep":
        after = optax.piecewise_constant_schedule(
            peak, {int(s) - warmup: decay_rate for s in decay_steps if s > warmup})
        return optax.join_schedules([optax.linear_schedule(warmup_lr, peak, warmup), after],
                                    [warmup])
    if kind == "timm_cosine":
        def schedule(step):
            t = jnp.asarray(step, jnp.float32)
            warm = warmup_lr + t * (peak - warmup_lr) / max(warmup, 1)
            phase = jnp.pi * jnp.minimum(t, total) / max(total, 1)
            return jnp.where(t < warmup, warm,
                             min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(phase)))
        return schedule
    raise ValueError(f"optim.schedule: unknown schedule {kind!r} (cosine, multistep or "
                     "timm_cosine)")


def decay_mask(params: Any, no_decay=()) -> Any:
    """True for tensors that get weight decay: every one with >= 2 dims (timm add_weight_decay),
    except those whose "/"-joined path matches a `no_decay` regex."""
    patterns = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, p: len(p.shape) >= 2 and not any(r.search(path_name(path, "/"))
                                                     for r in patterns), params)


def make_optimizer(
    config: Any, steps_per_epoch: int, lr_scales: Any = None
) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, lr schedule over optimizer-update counts) for `config.optim`.

    lr_scales: a tree like the params of per-parameter lr multipliers (layer-wise decay); they
    scale the whole AdamW update, weight decay included, as PyTorch's per-group lr does."""
    o = config.optim
    total = total_steps(config, steps_per_epoch)
    schedule = make_schedule(
        peak_lr(config), o.min_lr, warmup_steps(config, steps_per_epoch), total,
        warmup_lr=o.warmup_lr, kind=o.schedule, decay_rate=o.decay_rate,
        decay_steps=[round(e * steps_per_epoch) for e in o.decay_epochs])
    adamw = optax.adamw(
        schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        mask=functools.partial(decay_mask, no_decay=tuple(o.no_decay)))
    # Clipping sees the (micro-batch averaged) gradient of one update, as the official
    # clip_grad does after its accumulation.
    if lr_scales is not None:
        adamw = optax.chain(adamw, optax.stateless(
            lambda updates, params: jax.tree_util.tree_map(lambda u, s: u * s, updates,
                                                           lr_scales)))
    tx = adamw
    if o.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), adamw)
    return tx, schedule
