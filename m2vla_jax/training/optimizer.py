"""Optimizer of the trainable subtree: AdamW, warmup + cosine schedule, global-norm clipping, EMA.

Owns `make_schedule(config)`, `make_optimizer(config)` and the parameter groups (`group_of`). The
optimizer only ever sees the trainable parameters (a flat `{path: array}` dict); frozen parameters have
no optimizer state by construction.

Parameter groups (`config.optimizer.groups = [(name, regex, lr), ...]`, first full match decides, the
rest is group 'default' at `optimizer.lr`): each group gets its own AdamW with the same warmup + cosine
shape scaled to its peak lr (optax `multi_transform`), e.g. VLA-GSE's adapters at 1e-5 beside a head at
1e-4. Clipping stays global over all groups, as one optimizer would clip.
Gradient accumulation is done by the train step (scan over micro-batches), so one optimizer update is one
training step and the schedule counts optimizer steps.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_schedule(config: Any, peak_lr: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr` (default `optimizer.lr`), then cosine decay to
  `peak_lr * end_lr_factor` at `total_steps`."""
  opt = config.optimizer
  lr = opt.lr if peak_lr is None else peak_lr
  warmup = int(opt.warmup_steps)
  total = int(config.total_steps)
  if warmup >= total:
    return optax.linear_schedule(0.0, lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total,
      end_value=lr * opt.end_lr_factor)


DEFAULT_GROUP = "default"


def groups(config: Any) -> list[tuple[str, str, float]]:
  """[(name, regex, peak lr)] of `config.optimizer.groups` (empty when the field is absent)."""
  return [(str(n), str(r), float(lr)) for n, r, lr in (config.optimizer.get("groups") or ())]


def group_of(path: str, group_rules: list[tuple[str, str, float]]) -> str:
  """The group of a parameter path: the first rule whose regex fully matches, else 'default'."""
  for name, regex, _ in group_rules:
    if re.fullmatch(regex, path):
      return name
  return DEFAULT_GROUP


def _adamw(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  # Weight decay skips 1-D params (norms, biases).
  return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim > 1, params))


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule of the default group): clip_by_global_norm -> adamw per parameter group."""
  opt = config.optimizer
  schedule = make_schedule(config)
  parts = []
  if opt.clip_grad_norm and opt.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  rules = groups(config)
  if not rules:
    parts.append(_adamw(opt, schedule))
  else:
    transforms = {name: _adamw(opt, make_schedule(config, lr)) for name, _, lr in rules}
    transforms[DEFAULT_GROUP] = _adamw(opt, schedule)
    labels = lambda params: {k: group_of(k, rules) for k in params}
    parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts), schedule


def describe_groups(trainable: dict, frozen: dict, opt_state: Any, config: Any) -> str:
  """A table: parameters and % of all, optimizer-state bytes, per group (frozen as its own row)."""
  rules = groups(config)
  total = sum(int(v.size) for v in trainable.values()) + sum(int(v.size) for v in frozen.values())
  rows: dict[str, int] = {}
  for k, v in trainable.items():
    g = group_of(k, rules)
    rows[g] = rows.get(g, 0) + int(v.size)
  opt_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(opt_state)
                  if hasattr(x, "dtype"))
  lrs = {name: lr for name, _, lr in rules}
  lines = [f"{'group':>12} {'params':>14} {'% of all':>9} {'peak lr':>9}"]
  for g, n in sorted(rows.items()):
    lr = lrs.get(g, config.optimizer.lr)
    lines.append(f"{g:>12} {n:>14,d} {100.0 * n / max(total, 1):>8.3f}% {lr:>9.2g}")
  n_frozen = sum(int(v.size) for v in frozen.values())
  lines.append(f"{'frozen':>12} {n_frozen:>14,d} {100.0 * n_frozen / max(total, 1):>8.3f}% {'-':>9}")
  lines.append(f"optimizer state: {opt_bytes / 2**20:.2f} MiB for {sum(rows.values()):,d} trainable "
               f"parameters of {total:,d}")
  return "\n".join(lines)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype (float32)."""
  return jax.tree_util.tree_map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                                ema, params)


def global_norm(tree: Any) -> jax.Array:
  return optax.global_norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))
