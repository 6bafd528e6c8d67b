"""The M²-VLA action head D_φ (eqs. 3-4, 12-13): a denoising transformer, one block per VLM layer.

Block `l` reads VLM layer `layer_for_block[l]` through Mixture-of-Layers attention (`mol.py`) and the
retrieved skills through memory attention (`msm.MemoryAttention`):

    h    = LN_0(A_{l-1});   Q_A = W_q h
    A'_l = MoL(Q_A, h, [LN_s(S'_l ⊕ proprio)], LN_v(V'_l))           (5-9, head space)
    A_l  = A_{l-1} + W_o (A'_l + softmax(Q_A K^M^T/√d) V^M)            (12, 13, then the residual)
    A_l  = A_l + MLP(LN_1(A_l))

Pre-norm residual blocks (ours; the paper does not say), scanned over blocks with `nn.scan` so the
parameters carry a leading block axis (big_vision layout). The action chunk [B, H, A] is projected
linearly to H latents of width D plus a learned position embedding; the output is LN → Dense(A) with a
zero-initialised kernel (ours: at init D_φ ≈ 0, so one-step denoising starts from a = a_n).

Objectives (`HeadConfig.objective`):
  'one_step'       (paper default) a = a_n − D_φ(a_n, H), a_n ~ N(0, I); L1 to a_gt.
  'flow_matching'  π0 convention: x_t = t·noise + (1−t)·a, the head predicts v ≈ noise − a from
                   (x_t, t); t is embedded with sin-cos (π0 periods 4e-3..4) and fused with the action
                   embedding by a 2-layer swish MLP; sampling integrates Euler from t=1 to 0 in
                   `flow_steps` steps. Loss: MSE on v (as π0), masked like L1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2vla_jax.models import mol as mol_lib
from m2vla_jax.models import msm as msm_lib

OBJECTIVES = ("one_step", "flow_matching")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Action-head hyper-parameters. Fields marked (ours) are not stated by the paper.

  Attributes:
    horizon: action chunk length H_a.
    action_dim: action dimension A.
    width: latent width D of the head (ours: 512).
    num_heads: attention heads in every branch (ours: 8).
    head_dim: per-head dimension (ours: 64).
    mlp_dim: hidden width of the block MLP (ours: 4·width).
    num_blocks: head blocks; None = one per VLM layer (paper).
    layer_for_block: VLM layer read by each block; None = even mapping (`even_layer_mapping`).
    objective: 'one_step' (paper) or 'flow_matching'.
    flow_steps: Euler steps when sampling with flow matching.
    alpha_v_init: initial scalar visual gate alpha_v (ours: 1.0 = plain attention at init).
    mol: Mixture-of-Layers on (False = ablation: one softmax over [S; V; A], no gates).
    msm: memory attention on (False = ablation: no A_ref term, no memory parameters).
    dtype: computation dtype of the head.
  """
  horizon: int = 8
  action_dim: int = 7
  width: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 2048
  num_blocks: int | None = None
  layer_for_block: tuple[int, ...] | None = None
  objective: str = "one_step"
  flow_steps: int = 10
  alpha_v_init: float = 1.0
  mol: bool = True
  msm: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"head.objective={self.objective!r}; expected one of {OBJECTIVES}")
    if self.layer_for_block is not None and self.num_blocks is not None and \
        len(self.layer_for_block) != self.num_blocks:
      raise ValueError(f"head.layer_for_block has {len(self.layer_for_block)} entries but "
                       f"head.num_blocks={self.num_blocks}")


def even_layer_mapping(num_blocks: int, num_layers: int) -> tuple[int, ...]:
  """Block i reads layer round((i+1)·L/n) − 1: spread evenly, the last block reads the last layer."""
  if not 1 <= num_blocks <= num_layers:
    raise ValueError(f"head.num_blocks={num_blocks} must be in [1, {num_layers}] (VLM layers)")
  return tuple(int(round((i + 1) * num_layers / num_blocks)) - 1 for i in range(num_blocks))


def layers_for_blocks(config: HeadConfig, num_layers: int) -> tuple[int, ...]:
  """The VLM layer index read by every head block."""
  if config.layer_for_block is not None:
    bad = [l for l in config.layer_for_block if not 0 <= l < num_layers]
    if bad:
      raise ValueError(f"head.layer_for_block has layers {bad} outside [0, {num_layers})")
    return tuple(config.layer_for_block)
  return even_layer_mapping(config.num_blocks or num_layers, num_layers)


def posemb_sincos(t: jax.Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> jax.Array:
  """π0's sin-cos embedding of a scalar per example: t [B] -> [B, dim]."""
  fraction = jnp.linspace(0.0, 1.0, dim // 2)
  period = min_period * (max_period / min_period) ** fraction
  angle = t[:, None].astype(jnp.float32) * (2 * math.pi / period)[None, :]
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="Dense_1")(y)


class HeadBlock(nn.Module):
  """One head block (see module docstring). Scanned: `__call__(carry, *xs) -> (carry, gates)`."""
  config: HeadConfig

  @nn.compact
  def __call__(self, x: jax.Array, visual: jax.Array, query: jax.Array, visual_mask: jax.Array,
               query_mask: jax.Array, proprio: jax.Array, memory_tokens: jax.Array | None,
               memory_mask: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Args:
      x: [B, N, D] latents A_{l-1}.
      visual: [B, Nv, Dv] V'_l; visual_mask [B, Nv].
      query: [B, Nq, Dv] S'_l; query_mask [B, Nq].
      proprio: [B, P, Dv] projected proprio token(s), joined to the query branch.
      memory_tokens: [B, K, D] embedded retrieved chunks (None when msm is off); memory_mask [B, K].
    Returns:
      (A_l [B, N, D], gates).
    """
    c = self.config
    h = nn.LayerNorm(dtype=c.dtype, name="LayerNorm_0")(x)
    q = nn.DenseGeneral((c.num_heads, c.head_dim), dtype=c.dtype, name="query")(h)
    ctx_s = jnp.concatenate([query, proprio.astype(query.dtype)], axis=1)
    ctx_s = nn.LayerNorm(dtype=c.dtype, name="LayerNorm_s")(ctx_s)
    ctx_s_mask = jnp.concatenate([query_mask, jnp.ones(proprio.shape[:2], bool)], axis=1)
    ctx_v = nn.LayerNorm(dtype=c.dtype, name="LayerNorm_v")(visual)
    out, gates = mol_lib.MoLAttention(c.num_heads, c.head_dim, c.alpha_v_init, c.mol, c.dtype,
                                      name="MoL")(q, h, ctx_s, ctx_s_mask, ctx_s[:, :query.shape[1]],
                                                  query_mask, ctx_v, visual_mask)
    if c.msm:
      out = out + msm_lib.MemoryAttention(c.num_heads, c.head_dim, c.dtype, name="MSM")(
          q, memory_tokens, memory_mask)
    x = x + nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dtype=c.dtype, name="out")(out)
    x = x + MlpBlock(c.mlp_dim, c.dtype, name="MlpBlock")(nn.LayerNorm(dtype=c.dtype, name="LayerNorm_1")(x))
    return x, gates


class ActionHead(nn.Module):
  """D_φ: maps (noisy chunk, per-layer VLM states, proprio, retrieved skills[, t]) to a chunk [B,H,A]."""
  config: HeadConfig

  @nn.compact
  def __call__(self, noisy: jax.Array, visual: jax.Array, visual_mask: jax.Array, query: jax.Array,
               query_mask: jax.Array, state: jax.Array, memory_values: jax.Array | None = None,
               memory_mask: jax.Array | None = None, time: jax.Array | None = None,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Args:
      noisy: [B, H, A] a_n (one_step) or x_t (flow_matching).
      visual: [L, B, Nv, Dv] every VLM layer's visual states; visual_mask [B, Nv].
      query: [L, B, Nq, Dv] every VLM layer's query-token states; query_mask [B, Nq].
      state: [B, S] normalized proprio.
      memory_values: [B, K, H, A] retrieved chunks; memory_mask [B, K]. Required when config.msm.
      time: [B] flow time in [0, 1]; required for 'flow_matching'.
    Returns:
      (out [B, H, A] — D_φ(a_n, H) or the velocity, gates {'alpha_s': [nb, B, h], 'alpha_v': [nb]}).
    """
    c = self.config
    layers = jnp.asarray(layers_for_blocks(c, visual.shape[0]))
    visual, query = visual[layers], query[layers]
    batch, horizon, _ = noisy.shape

    x = nn.Dense(c.width, dtype=c.dtype, name="action_in")(noisy.astype(c.dtype))
    if c.objective == "flow_matching":
      if time is None:
        raise ValueError("ActionHead: `time` is required for head.objective='flow_matching'")
      t_emb = jnp.broadcast_to(posemb_sincos(time, c.width)[:, None], (batch, horizon, c.width))
      y = nn.swish(nn.Dense(c.width, dtype=c.dtype, name="action_time_in")(
          jnp.concatenate([x, t_emb.astype(x.dtype)], axis=-1)))
      x = nn.Dense(c.width, dtype=c.dtype, name="action_time_out")(y)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (horizon, c.width))[None]

    proprio = nn.Dense(visual.shape[-1], dtype=c.dtype, name="state_proj")(state.astype(c.dtype))[:, None]

    memory_tokens = None
    if c.msm:
      if memory_values is None or memory_mask is None:
        raise ValueError("ActionHead: memory_values/memory_mask are required when head.msm=True")
      flat = memory_values.reshape(memory_values.shape[:2] + (-1,)).astype(c.dtype)
      memory_tokens = nn.Dense(c.width, dtype=c.dtype, name="memory_embed")(flat)

    blocks = nn.scan(HeadBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, 0) + (nn.broadcast,) * 5, length=len(layers))
    x, gates = blocks(c, name="blocks")(x, visual.astype(c.dtype), query.astype(c.dtype), visual_mask,
                                        query_mask, proprio, memory_tokens, memory_mask)
    x = nn.LayerNorm(dtype=c.dtype, name="out_norm")(x)
    out = nn.Dense(noisy.shape[-1], dtype=c.dtype, kernel_init=nn.initializers.zeros,
                   name="action_out")(x)
    return out.astype(jnp.float32), gates


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean |pred − target| over valid steps: pred/target [B, H, A], mask [B, H]."""
  m = mask.astype(jnp.float32)[..., None]
  return (jnp.abs(pred - target) * m).sum() / jnp.maximum(m.sum() * pred.shape[-1], 1.0)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.astype(jnp.float32)[..., None]
  return (jnp.square(pred - target) * m).sum() / jnp.maximum(m.sum() * pred.shape[-1], 1.0)


def sample_flow_time(rng: jax.Array, batch: int) -> jax.Array:
  """π0's time distribution: Beta(1.5, 1) · 0.999 + 0.001 (more weight near t=1, pure noise)."""
  return jax.random.beta(rng, 1.5, 1.0, (batch,)) * 0.999 + 0.001


def objective_loss(apply_fn, config: HeadConfig, actions: jax.Array, action_mask: jax.Array,
                   rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
  """Training loss of the head objective. `apply_fn(noisy, time) -> (out, gates)` closes over context.

  Returns (loss, {'gates': ..., 'l1': L1 of the denoised chunk (one_step) or of the one-step
  estimate noise − v (flow)}).
  """
  noise_rng, time_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
  if config.objective == "one_step":
    out, gates = apply_fn(noise, None)
    pred = noise - out
    loss = masked_l1(pred, actions, action_mask)
    return loss, {"gates": gates, "l1": loss}
  t = sample_flow_time(time_rng, actions.shape[0])
  x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
  v, gates = apply_fn(x_t, t)
  loss = masked_mse(v, noise - actions, action_mask)
  return loss, {"gates": gates, "l1": masked_l1(x_t - t[:, None, None] * v, actions, action_mask)}


def sample(apply_fn, config: HeadConfig, shape: Sequence[int], rng: jax.Array) -> jax.Array:
  """Draws an action chunk [B, H, A]; `apply_fn(noisy, time) -> (out, gates)` closes over context."""
  noise = jax.random.normal(rng, tuple(shape), jnp.float32)
  if config.objective == "one_step":
    return noise - apply_fn(noise, None)[0]
  dt = 1.0 / config.flow_steps

  def step(x, i):
    t = jnp.full((shape[0],), 1.0 - i * dt, jnp.float32)
    return x - dt * apply_fn(x, t)[0], None

  x, _ = jax.lax.scan(step, noise, jnp.arange(config.flow_steps))
  return x
