"""Optimizer of the trainable subtree: AdamW, warmup + cosine schedule, global-norm clipping, EMA.

Owns `make_schedule(config)` and `make_optimizer(config)`. The optimizer only ever sees the trainable
parameters (a flat `{path: array}` dict); frozen parameters have no optimizer state by construction.
Gradient accumulation is done by the train step (scan over micro-batches), so one optimizer update is one
training step and the schedule counts optimizer steps.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_schedule(config: Any) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_lr_factor` at `total_steps`."""
  opt = config.optimizer
  warmup = int(opt.warmup_steps)
  total = int(config.total_steps)
  if warmup >= total:
    return optax.linear_schedule(0.0, opt.lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=warmup, decay_steps=total,
      end_value=opt.lr * opt.end_lr_factor)


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule): clip_by_global_norm -> adamw(schedule). Weight decay skips 1-D params (norms, biases)."""
  opt = config.optimizer
  schedule = make_schedule(config)

  def decay_mask(params):
    return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)

  parts = []
  if opt.clip_grad_norm and opt.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype (float32)."""
  return jax.tree_util.tree_map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                                ema, params)


def global_norm(tree: Any) -> jax.Array:
  return optax.global_norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))
