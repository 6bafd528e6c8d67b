"""The training state pytree and the pure init / train-step / eval-step functions built around a policy.

Owns `TrainState` and the functions the trainer jits. Only `trainable` (a flat `{path: array}` dict chosen
by `freezing.trainable_mask(params, policy.trainable_rules)`) is differentiated and has optimizer state
and an EMA; `frozen` holds the rest in `policy.frozen_dtype`. The policy state (`{'msm': memory}`) threads through
every micro-batch of a step. Step randomness is `fold_in(rng, step)`, so it does not depend on how many
steps a process ran before a resume.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from m2vla_jax.core import freezing
from m2vla_jax.training import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array                  # int32 [] optimizer steps taken
  trainable: dict                  # {path: float32 array}
  frozen: dict                     # {path: array in frozen_dtype}
  opt_state: Any                   # optax state of `trainable`
  ema: Optional[dict]              # {path: float32 array} or None
  rng: jax.Array                   # uint32 [2] base key of the run
  policy_state: dict               # {'msm': memory}

  def params(self) -> dict:
    return freezing.merge(self.trainable, self.frozen)


def make_init_fn(policy: Any, tx: optax.GradientTransformation, example_batch: Any, rules: Any,
                 frozen_dtype: Any, use_ema: bool) -> Callable[[jax.Array], TrainState]:
  """init(rng) -> TrainState; pure, so it can be `jax.eval_shape`d and jitted with out_shardings."""

  def init(rng):
    init_rng, run_rng = jax.random.split(rng)
    params, state = policy.init(init_rng, example_batch)
    mask = freezing.trainable_mask(params, rules)
    trainable, frozen = freezing.split(params, mask)
    if not trainable:
      raise ValueError("config.model.trainable freezes every parameter; nothing would train")
    trainable = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), trainable)
    frozen = freezing.cast_frozen(frozen, frozen_dtype)
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable),
        ema=jax.tree_util.tree_map(jnp.copy, trainable) if use_ema else None, rng=run_rng,
        policy_state=state)

  return init


def _split_microbatches(batch: Any, n: int) -> Any:
  """[B, ...] -> [n, B/n, ...] taking every n-th example, so each device keeps its own rows."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by config.grad_accum_steps={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


def make_train_step(policy: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0):
  """train_step(ts, batch) -> (ts, metrics). Metrics are scalars or small vectors (e.g. MoL gates)."""

  def loss_and_grad(trainable, frozen, policy_state, batch, rng):
    def loss_fn(tr):
      params = freezing.merge(tr, frozen)
      loss, (metrics, new_state) = policy.loss(params, policy_state, batch, rng)
      return loss, (metrics, new_state)
    (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, metrics, new_state, grads

  def train_step(ts: TrainState, batch: Any):
    rng = jax.random.fold_in(ts.rng, ts.step)
    if grad_accum_steps == 1:
      loss, metrics, policy_state, grads = loss_and_grad(ts.trainable, ts.frozen, ts.policy_state, batch, rng)
    else:
      micro = _split_microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        grads_acc, state = carry
        mb, i = xs
        loss, metrics, state, grads = loss_and_grad(ts.trainable, ts.frozen, state, mb,
                                                    jax.random.fold_in(rng, i))
        grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
        return (grads_acc, state), (loss, metrics)

      zeros = jax.tree_util.tree_map(jnp.zeros_like, ts.trainable)
      (grads, policy_state), (losses, metrics) = jax.lax.scan(
          body, (zeros, ts.policy_state), (micro, jnp.arange(grad_accum_steps)))
      grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grads)
      loss = losses.mean()
      metrics = jax.tree_util.tree_map(lambda m: m.mean(0), metrics)
    updates, opt_state = tx.update(grads, ts.opt_state, ts.trainable)
    trainable = optax.apply_updates(ts.trainable, updates)
    ema = ts.ema
    if ema is not None:
      ema = optimizer_lib.ema_update(ema, trainable, ema_decay)
    out = dict(metrics)
    out.update(loss=loss, grad_norm=optimizer_lib.global_norm(grads),
               param_norm=optimizer_lib.global_norm(trainable), lr=schedule(ts.step))
    new_ts = ts.replace(step=ts.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                        policy_state=policy_state)
    return new_ts, out

  return train_step


def make_eval_step(policy: Any):
  """eval_step(ts, batch) -> metrics: the loss on held-out data; the memory is read, never written."""

  def eval_step(ts: TrainState, batch: Any):
    rng = jax.random.fold_in(jax.random.fold_in(ts.rng, ts.step), 0x5EED)
    loss, (metrics, _) = policy.loss(ts.params(), ts.policy_state, batch, rng)
    out = {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}
    out["loss"] = loss
    return out

  return eval_step
